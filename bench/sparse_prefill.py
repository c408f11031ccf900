"""Sparse prefill attention vs dense SDPA (cuDNN, FlashAttention-2) for one layer of the 8B shape.

    PYTHONPATH=. python3 bench/sparse_prefill.py check            # GPU correctness vs float32 references
    PYTHONPATH=. python3 bench/sparse_prefill.py tune             # tile / warps / stages sweep (dense work)
    PYTHONPATH=. python3 bench/sparse_prefill.py table --lengths 32768 131072 524288 1048576 --out r.json

Inputs are random with planted structure (an attention sink, 16 heavy key columns, the local diagonal
and one far diagonal), scaled with log(length) so the planted items keep most of the attention mass at
every length. Sparse timings include index estimation. Recall = share of the dense attention mass (on
sampled query rows of every head) that the chosen index keeps. Dense baselines with few repetitions at
long lengths are marked in the output (`dense_reps`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from terse.kernels.checks import num_blocks
from terse.kernels.estimate import estimate_vertical_slash
from terse.kernels.estimate_blocks import estimate_block_sparse
from terse.kernels.prefill_config import EstimateConfig
from terse.kernels.varlen import VarlenBatch
from terse.kernels.vertical_slash import convert_vertical_slash

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128


def planted_inputs(length: int, num_q: int, num_kv: int, head_dim: int, device: str, dtype: torch.dtype,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [L, Hq, D], k/v [L, Hkv, D] with a sink, 16 columns, the local and one far diagonal per kv head."""
    gen = torch.Generator(device=device).manual_seed(seed)
    group, sigma, beta = num_q // num_kv, 0.7, 4.0
    log_len = math.log(length)
    sink_logit, col_logit, diag_logit = log_len + 4.0, log_len + 1.0, log_len + 2.2
    q = torch.empty(length, num_q, head_dim, dtype=dtype, device=device)
    k = torch.empty(length, num_kv, head_dim, dtype=dtype, device=device)
    for h in range(num_kv):
        r = torch.randn(length, head_dim, generator=gen, device=device) * sigma  # query background
        u = torch.randn(head_dim, generator=gen, device=device)
        u /= u.norm()
        k_h = torch.randn(length, head_dim, generator=gen, device=device) * sigma
        cols = torch.randint(1, length, (16,), generator=gen, device=device)
        k_h[0] += u * (sink_logit * math.sqrt(head_dim) / beta)
        k_h[cols] += u * (col_logit * math.sqrt(head_dim) / beta)
        gamma = diag_logit / (sigma**2 * math.sqrt(head_dim))
        far = int(torch.randint(length // 8, max(length // 8 + 1, length // 2), (1,), generator=gen, device=device))
        k_h += gamma * r  # diagonal 0: q_i . k_i
        k_h[: length - far] += gamma * r[far:]  # diagonal `far`: q_i . k_{i - far}
        for g in range(group):
            noise = torch.randn(length, head_dim, generator=gen, device=device) * 0.2
            q[:, h * group + g] = (r + beta * u + noise).to(dtype)
        k[:, h] = k_h.to(dtype)
        del r, k_h
    v = torch.randn(length, num_kv, head_dim, generator=gen, device=device).to(dtype)
    return q, k, v


def time_ms(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median of `reps` CUDA-event timings after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def adaptive_ms(fn: Callable[[], Any], budget_ms: float = 4000.0, max_reps: int = 20) -> tuple[float, int]:
    """One warm-up + one probe decide how many repetitions fit `budget_ms`; returns (median, reps)."""
    probe = time_ms(fn, 1, warmup=1)
    reps = int(max(1, min(max_reps, budget_ms // max(probe, 1e-3))))
    if reps == 1:
        return probe, 1
    return time_ms(fn, reps, warmup=0), reps


def causal_flops(q_len: int, num_heads: int, head_dim: int) -> float:
    return 4.0 * num_heads * head_dim * q_len * q_len / 2


# ----------------------------------------------------------------------------------------- check
def run_check(device: str) -> list[dict[str, Any]]:
    from terse.kernels.a_shape import a_shape_attention
    from terse.kernels.block_sparse import block_sparse_attention
    from terse.kernels.reference import (
        reference_a_shape_attention,
        reference_block_sparse_attention,
        reference_vertical_slash_attention,
    )
    from terse.kernels.vertical_slash import vertical_slash_attention

    rows = []
    cases = [  # (dtype, head_dim, Hq, Hkv, q_lens, k_lens, block_q, block_k)
        (torch.bfloat16, 128, 8, 2, [1000, 2048], [3000, 2048], 64, 64),
        (torch.bfloat16, 128, 8, 2, [1000, 2048], [3000, 2048], 128, 64),
        (torch.float16, 64, 4, 4, [777, 1500], [777, 2500], 64, 64),
        (torch.bfloat16, 64, 8, 1, [513, 1024], [1024, 1024], 128, 128),
    ]
    for dtype, d, hq, hkv, q_lens, k_lens, bq, bk in cases:
        torch.manual_seed(len(rows))
        q = torch.randn(sum(q_lens), hq, d, device=device, dtype=dtype)
        k = torch.randn(sum(k_lens), hkv, d, device=device, dtype=dtype)
        v = torch.randn(sum(k_lens), hkv, d, device=device, dtype=dtype)
        batch = VarlenBatch.from_lengths(q, k, v, q_lens, k_lens)
        mq, mk, scale = max(q_lens), max(k_lens), d**-0.5
        nqb, nkb = num_blocks(mq, bq), num_blocks(mk, bk)
        bidx = torch.stack([torch.randperm(nkb, device=device)[:8] for _ in range(2 * hq * nqb)])
        bidx = bidx.view(2, hq, nqb, 8).sort(-1).values.to(torch.int32).contiguous()
        bcnt = torch.randint(0, 9, (2, hq, nqb), device=device, dtype=torch.int32)
        vi = torch.randint(-1, mk, (2, hq, 100), device=device, dtype=torch.int32)
        si = torch.randint(-1, mk, (2, hq, 20), device=device, dtype=torch.int32)
        ns = torch.randint(0, 100, (hq,), device=device, dtype=torch.int32)
        win = torch.randint(1, 1500, (hq,), device=device, dtype=torch.int32)
        blk = dict(block_size_q=bq, block_size_k=bk)
        pairs = {
            "block_sparse": (block_sparse_attention(batch, bidx, bcnt, scale, **blk),
                             reference_block_sparse_attention(batch, bidx, bcnt, scale, **blk)),
            "vertical_slash": (vertical_slash_attention(batch, vi, si, scale, **blk),
                               reference_vertical_slash_attention(batch, vi, si, scale, **blk)),
            "a_shape": (a_shape_attention(batch, ns, win, scale, **blk),
                        reference_a_shape_attention(batch, ns, win, scale)),
        }
        for name, (out, ref) in pairs.items():
            err = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append({"kernel": name, "dtype": str(dtype), "head_dim": d, "gqa": hq // hkv,
                         "block": f"{bq}x{bk}", "rel_err": err, "nan": bool(out.isnan().any())})
            print(f"check {name:15s} {str(dtype):15s} D={d} gqa={hq // hkv} {bq}x{bk} rel_err={err:.2e}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ tune
def full_causal_index(length: int, num_heads: int, bq: int, bk: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    nqb, nkb = num_blocks(length, bq), num_blocks(length, bk)
    idx = torch.arange(nkb, device=device, dtype=torch.int32).expand(1, num_heads, nqb, nkb).contiguous()
    last_q = torch.clamp((torch.arange(nqb, device=device) + 1) * bq, max=length) - 1
    count = (last_q // bk + 1).to(torch.int32).expand(1, num_heads, nqb).contiguous()
    return idx, count


def _tune_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bq: int, bk: int) -> tuple[float, float]:
    import terse.kernels.a_shape as a_shape_mod
    import terse.kernels.block_sparse as bs_mod

    length, device = q.shape[0], str(q.device)
    batch = VarlenBatch.from_lengths(q, k, v, [length], [length])
    idx, cnt = full_causal_index(length, NUM_Q_HEADS, bq, bk, device)
    ns = torch.zeros(NUM_Q_HEADS, dtype=torch.int32, device=device)
    win = torch.full((NUM_Q_HEADS,), length + 1, dtype=torch.int32, device=device)
    blk = {"block_size_q": bq, "block_size_k": bk}
    t_bs = time_ms(lambda: bs_mod.block_sparse_attention(batch, idx, cnt, 0.088, **blk), 5)
    t_as = time_ms(lambda: a_shape_mod.a_shape_attention(batch, ns, win, 0.088, **blk), 5)
    return t_bs, t_as


def run_tune(device: str, lengths: list[int]) -> list[dict[str, Any]]:
    import terse.kernels.a_shape as a_shape_mod
    import terse.kernels.block_sparse as bs_mod

    rows: list[dict[str, Any]] = []
    original = bs_mod.kernel_config
    configs = [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3)]
    for length in lengths:
        qkv = planted_inputs(length, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, device, torch.bfloat16)
        flops = causal_flops(length, NUM_Q_HEADS, HEAD_DIM)
        for bq, bk, warps, stages in configs:
            cfg = {"num_warps": warps, "num_stages": stages}
            bs_mod.kernel_config = lambda d, b, cfg=cfg: cfg  # type: ignore[assignment]
            a_shape_mod.kernel_config = lambda d, b, cfg=cfg: cfg  # type: ignore[assignment]
            try:
                t_bs, t_as = _tune_one(*qkv, bq, bk)
            except Exception as e:  # a config may not fit shared memory; record and go on
                print(f"tune L={length} {bq}x{bk} w{warps} s{stages}: failed {type(e).__name__}: {e}"[:300])
                continue
            row = {"length": length, "block": f"{bq}x{bk}", "num_warps": warps, "num_stages": stages,
                   "index_kernel_ms": t_bs, "index_tflops": flops / t_bs / 1e9,
                   "a_shape_dense_ms": t_as, "a_shape_tflops": flops / t_as / 1e9}
            rows.append(row)
            print(f"tune L={length:7d} {bq}x{bk} w{warps} s{stages}: block-index dense {t_bs:8.2f} ms "
                  f"({row['index_tflops']:5.0f} TF/s)  a-shape dense {t_as:8.2f} ms ({row['a_shape_tflops']:5.0f} TF/s)",
                  flush=True)
        del qkv
    bs_mod.kernel_config = original  # type: ignore[assignment]
    a_shape_mod.kernel_config = original  # type: ignore[assignment]
    return rows


# ----------------------------------------------------------------------------------------- table
def sdpa_dense(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, backend: Any) -> Callable[[], Any]:
    from torch.nn.attention import sdpa_kernel

    def fn() -> Any:
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)

    return fn


def index_recall(q: torch.Tensor, k: torch.Tensor, block_idx: torch.Tensor, block_count: torch.Tensor,
                 col_idx: torch.Tensor | None, col_count: torch.Tensor | None, bq: int, bk: int,
                 num_rows: int = 64) -> float:
    """Mean over heads and sampled query rows of the dense attention mass inside the index's mask."""
    from terse.pipelines.pattern_search.search import RowIndex, dense_row_probs, rows_mask

    length, num_q, d = q.shape
    rows = torch.linspace(length // 4, length - 1, num_rows, device=q.device).long()
    kept = []
    for h in range(num_q):  # one head at a time: [R, L] float32 at 1M tokens is 256 MB
        group = num_q // k.shape[1]
        probs = dense_row_probs(q[:, h : h + 1], k[:, h // group : h // group + 1], rows, d**-0.5)[0]
        index = RowIndex(block_idx[0, h], block_count[0, h],
                         None if col_idx is None else col_idx[0, h], None if col_count is None else col_count[0, h])
        kept.append((probs * rows_mask(index, rows, length, bq, bk)).sum(-1).mean().item())
    return sum(kept) / len(kept)


def computed_density(block_count: torch.Tensor, col_count: torch.Tensor | None, length: int, bq: int, bk: int) -> float:
    """Computed key tiles (blocks + column tiles) over the tiles of dense causal attention."""
    nqb = num_blocks(length, bq)
    last_q = torch.clamp((torch.arange(nqb, device=block_count.device) + 1) * bq, max=length) - 1
    dense = (last_q // bk + 1).sum().item() * block_count.shape[1]
    tiles = block_count.sum().item()
    if col_count is not None:
        tiles += torch.ceil(col_count.float() / bk).sum().item()
    return tiles / dense


def sparse_pipelines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: argparse.Namespace
                     ) -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """name -> (estimate-only fn returning the index, full fn: the engine entry point, estimation included)."""
    from terse.kernels.patterns import BlockSparsePattern, VerticalSlashPattern
    from terse.kernels.prefill import SparsePrefillConfig, sparse_prefill

    length, device = q.shape[0], q.device
    batch = VarlenBatch.from_lengths(q, k, v, [length], [length])
    bq, bk, scale = args.block_q, args.block_k, HEAD_DIM**-0.5
    vs = VerticalSlashPattern(num_vertical=args.vs_vertical, num_slash=args.vs_slash, target_mass=args.mass)
    bs = BlockSparsePattern(num_blocks=args.bs_blocks, target_mass=args.mass)
    est_cfg = EstimateConfig(num_local_diagonals=bk)
    config = SparsePrefillConfig(min_sparse_q_len=1, block_size_q=bq, block_size_k=bk, estimate=est_cfg)
    heads = NUM_Q_HEADS

    def vs_index() -> Any:
        vi, si = estimate_vertical_slash(
            batch, torch.full((heads,), vs.num_vertical, device=device),
            torch.full((heads,), vs.num_slash, device=device), torch.full((heads,), vs.target_mass, device=device),
            scale, config=est_cfg,
        )
        return convert_vertical_slash(vi, si, batch.layout, block_size_q=bq, block_size_k=bk)

    def bs_index() -> Any:
        return estimate_block_sparse(
            batch, torch.full((heads,), bs.num_blocks, device=device),
            torch.full((heads,), bs.target_mass, device=device), scale, block_size_q=bq, block_size_k=bk,
        )

    def run(pattern: Any) -> Callable[[], Any]:
        return lambda: sparse_prefill(batch, [pattern] * heads, scale, config=config)

    return {"vertical_slash": (vs_index, run(vs)), "block_sparse": (bs_index, run(bs))}


def dense_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int, args: argparse.Namespace) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    q4, k4, v4 = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
    row: dict[str, Any] = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("fa2", SDPBackend.FLASH_ATTENTION)):
        if name == "fa2" and length > args.max_fa2_len:
            prev = args.fa2_cache.get("last")
            if prev is not None:  # quadratic extrapolation from the longest timed length
                row[f"{name}_ms"] = prev[1] * (length / prev[0]) ** 2
                row[f"{name}_reps"] = "extrapolated"
            continue
        fn = sdpa_dense(q4, k4, v4, backend)
        budget = 4000.0 if length <= 131072 else 1.0  # long: one warm-up + one timed run
        try:
            ms, reps = adaptive_ms(fn, budget_ms=budget)
        except RuntimeError as e:  # record and go on: the sparse rows are still worth having
            print(f"dense {name} at {length} failed: {e}"[:300], flush=True)
            continue
        row[f"{name}_ms"], row[f"{name}_reps"] = ms, reps
        if name == "fa2":
            args.fa2_cache["last"] = (length, ms)
    del q4, k4, v4
    return row


def run_table(device: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    args.fa2_cache = {}
    for length in args.lengths:
        torch.cuda.empty_cache()
        q, k, v = planted_inputs(length, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, device, torch.bfloat16)
        row: dict[str, Any] = {"length": length, **dense_row(q, k, v, length, args)}
        for name, (index_fn, full_fn) in sparse_pipelines(q, k, v, args).items():
            index = index_fn()
            if name == "vertical_slash":
                bidx, bcnt, cidx, ccnt = index
            else:
                (bidx, bcnt), cidx, ccnt = index, None, None
            row[f"{name}_recall"] = index_recall(q, k, bidx, bcnt, cidx, ccnt, args.block_q, args.block_k)
            row[f"{name}_density"] = computed_density(bcnt, ccnt, length, args.block_q, args.block_k)
            del index, bidx, bcnt, cidx, ccnt
            row[f"{name}_estimate_ms"], _ = adaptive_ms(index_fn, budget_ms=1500.0, max_reps=10)
            row[f"{name}_ms"], row[f"{name}_reps"] = adaptive_ms(full_fn, budget_ms=3000.0, max_reps=10)
            row[f"{name}_speedup_vs_cudnn"] = row.get("cudnn_ms", float("nan")) / row[f"{name}_ms"]
        rows.append(row)
        print("table " + json.dumps(row), flush=True)
        with open(args.out + ".partial", "w") as f:  # survives a crash at a later length
            json.dump(rows, f)
        del q, k, v
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'tokens':>8} {'cuDNN ms':>10} {'FA2 ms':>10} {'VS ms':>9} {'(est)':>7} {'VS x':>6} {'VS rec':>7} "
          f"{'VS dens':>8} {'BS ms':>9} {'(est)':>7} {'BS x':>6} {'BS rec':>7} {'BS dens':>8}")
    for r in rows:
        print(f"{r['length']:>8} {r.get('cudnn_ms', float('nan')):>10.1f} {r.get('fa2_ms', float('nan')):>10.1f} "
              f"{r['vertical_slash_ms']:>9.2f} {r['vertical_slash_estimate_ms']:>7.2f} "
              f"{r['vertical_slash_speedup_vs_cudnn']:>6.2f} {r['vertical_slash_recall']:>7.3f} "
              f"{r['vertical_slash_density']:>8.4f} {r['block_sparse_ms']:>9.2f} {r['block_sparse_estimate_ms']:>7.2f} "
              f"{r['block_sparse_speedup_vs_cudnn']:>6.2f} {r['block_sparse_recall']:>7.3f} {r['block_sparse_density']:>8.4f}")


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("cudnn_ms", "SDPA cuDNN (dense)"), ("fa2_ms", "SDPA FlashAttention-2 (dense)"),
                       ("vertical_slash_ms", "terse vertical-slash (incl. estimation)"),
                       ("block_sparse_ms", "terse block-sparse (incl. estimation)")):
        pts = [(r["length"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
    ax.set_xlabel("prompt tokens (one layer: 32 q heads, 8 kv heads, head dim 128, bf16)")
    ax.set_ylabel("attention time per layer (ms)")
    ax.set_title("Causal prefill attention on one H200")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="+", choices=["check", "tune", "table"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--tune-lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--block-q", type=int, default=64)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--vs-vertical", type=int, default=1024)
    parser.add_argument("--vs-slash", type=int, default=256)
    parser.add_argument("--bs-blocks", type=int, default=64)
    parser.add_argument("--mass", type=float, default=0.95)
    parser.add_argument("--max-fa2-len", type=int, default=524288)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sparse_prefill.json"))
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version(), "args": {k: v for k, v in vars(args).items() if k != "fa2_cache"},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(meta), flush=True)
    result: dict[str, Any] = {"meta": meta}
    if "check" in args.mode:
        result["check"] = run_check("cuda")
    if "tune" in args.mode:
        result["tune"] = run_tune("cuda", args.tune_lengths)
    if "table" in args.mode:
        result["table"] = run_table("cuda", args)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if "table" in args.mode:
        if args.plot:
            plot(result["table"], args.plot)
        print_table(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
