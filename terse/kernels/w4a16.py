"""`w4a16_matmul`: x @ W + bias for an INT4 weight in terse's layout, on CUDA, through the fastest of
its paths for the shape, measured once:

    gemm      one to many rows: Triton GEMM on the packed weight, dequantization in registers, optional
              split-K (w4a16_gemm); for skinny products in the swapped form out^T = W^T x^T
    gemv      one row: split-K GEMV with float32 FMAs (w4a16_gemv)
    offset    one 16-bit row: GEMV with offset floats, one small tile at a time (w4a16_gemv_offset)
    column    one 16-bit row: the offset arithmetic over narrow column blocks and several whole groups
              per step, pipelined, split-K only where the column blocks do not fill the GPU
              (w4a16_gemv_column; the fastest at every 8B projection on an H200)
    dequant   many rows: dequantize the whole weight, then one dense matmul (cuBLAS)

Plans are chosen per (row-count bucket, N, K, group size, scheme, dtype, device): the first product of a
bucket times every candidate and keeps the fastest. Candidates are timed the way the engine runs them,
inside a CUDA graph of back-to-back calls rotating over copies of the weight larger than the L2 cache
(w4a16_timing); timed one eager launch at a time, a product of a few microseconds would measure the
~20 us launch path instead. During CUDA graph capture nothing is timed: a bucket not yet measured takes
the heuristic plan (the engine runs each graph's batch size eagerly before capturing it, so decode
buckets are measured by then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from terse.kernels.checks import interpreting
from terse.kernels.row_prep import PACKED_ROW, RowPrep
from terse.kernels.w4a16_layout import Int4Weight, check_w4a16_inputs

PlanKind = Literal["offset", "column", "gemv", "gemm", "dequant"]


@dataclass(frozen=True)
class Plan:
    """One way to run a product: a path and its launcher's tile options."""

    kind: PlanKind
    options: tuple[tuple[str, int], ...] = ()

    def describe(self) -> str:
        return self.kind + "".join(f" {k}={v}" for k, v in self.options)


COLUMN_GROUP_SIZES = (16, 32, 64, 128, 256, 512)
"""Group sizes the column GEMV takes (w4a16_gemv_column.GROUP_SIZES; no triton import here)."""

PlanKey = tuple[str, int, int, int, int, bool, str]
_PLANS: dict[PlanKey, Plan] = {}
_TIMINGS: dict[PlanKey, list[tuple[str, float]]] = {}


def chosen_plans() -> dict[PlanKey, tuple[Plan, list[tuple[str, float]]]]:
    """Every plan picked so far with the timings (ms) of the candidates measured for it."""
    return {key: (plan, _TIMINGS.get(key, [])) for key, plan in _PLANS.items()}


def w4a16_matmul(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None, *, check: bool = True,
    prep: RowPrep | None = None,
) -> torch.Tensor:
    """x: [M, K] (any row stride, contiguous along K) -> [M, N] in x's dtype. CUDA (or the interpreter).

    `check=False` skips the input checks: for layers that validated their weight once and pass x of the
    right shape and dtype (a decode step's dozens of products pay no Python checks). `prep`: x's
    `RowPrep` (one row, span from `row_prep_span`), used where the plan is the column GEMV."""
    if check:
        check_w4a16_inputs(x, weight, bias)
    if weight.input_perm is not None:
        x = x.index_select(1, weight.input_perm)  # act-order checkpoints: stored row r multiplies x[:, perm[r]]
        prep = None  # a prep of the unpermuted row
    if x.shape[0] == 0:
        return torch.empty(0, weight.out_features, dtype=x.dtype, device=x.device)
    return run_plan(_plan(x, weight, bias), x, weight, bias, prep)


ROW_PREP_MIN_COLUMNS_PER_WARP = 32
"""A one-row column GEMV takes a `RowPrep` from the kernel that writes its input when its tile has at
least this many columns per warp. On an H200 (8B shapes, bf16, launch-free) the prep made the tiles of
32 columns per warp 9-17% faster (gate/up, down, the LM head) and the 16-column four-warp tiles of q/k/v
and o slower: 3-6% with per-row sums, 30-110% with group sums (terse/kernels/row_prep.py)."""


def row_prep_span(device: torch.device, dtype: torch.dtype, weight: Int4Weight) -> int:
    """The `RowPrep` span the one-row product of a [1, K] x of `dtype` on `device` takes from the kernel
    that writes x: the weight's group size where its measured plan is a column GEMV wide enough per warp
    (`ROW_PREP_MIN_COLUMNS_PER_WARP`), else 0 (it works from x alone). A producer that cannot sum whole
    groups may give sums per packed row (span 8) instead. Looks plans up without measuring: 0 until the
    product ran once (the engine runs each decode graph's batch eagerly before capturing it)."""
    if dtype not in (torch.bfloat16, torch.float16) or weight.input_perm is not None:
        return 0
    plan = _PLANS.get(_plan_key(device, 1, weight, dtype))
    if plan is None and interpreting():
        plan = heuristic_plan(1, weight, _num_sms(device))
    if plan is None or plan.kind != "column":
        return 0
    o = dict(plan.options)
    return weight.group_size if o["block_n"] >= ROW_PREP_MIN_COLUMNS_PER_WARP * o["num_warps"] else 0


def w4a16_matmul_silu_mul(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None, *, check: bool = True,
    prep: RowPrep | None = None, prep_into: RowPrep | None = None,
) -> torch.Tensor | None:
    """silu(gate) * up of the product x @ W + bias = [gate | up] (a fused gate/up projection, N = 2I) in
    the product's own launch, equal to `silu_mul_triton` of `w4a16_matmul`'s result: [1, I]. None when
    the product does not run the column GEMV (more rows, float32, act-order, or another plan measured
    faster): the caller applies the activation to the plain product. x: [1, K]; `check` and `prep` as in
    `w4a16_matmul`; `prep_into`: buffers (`empty_prep(I, 8)`) the store fills with the result's prep per
    packed row, for the product after (left unwritten when this returns None)."""
    if check:
        check_w4a16_inputs(x, weight, bias)
    if x.shape[0] != 1 or weight.input_perm is not None or weight.out_features % 2:
        return None
    plan = _plan(x, weight, bias)
    if plan.kind != "column":
        return None
    from terse.kernels.w4a16_gemv_column import launch_gemv_column

    o = dict(plan.options)
    return launch_gemv_column(x, weight, bias, o["block_n"], o["groups"], o["split_k"], o["num_warps"],
                              o["num_stages"], silu_mul=True, prep=_usable(prep, weight), prep_into=prep_into)


def _usable(prep: RowPrep | None, weight: Int4Weight) -> RowPrep | None:
    """prep where the column GEMV takes its span for this weight, else None (the product works from x)."""
    return prep if prep is not None and prep.span in (PACKED_ROW, weight.group_size) else None


def w4a16_matmul_rope_store(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, cos_table: torch.Tensor, sin_table: torch.Tensor,
    positions: torch.Tensor, layer_kv: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The fused q/k/v product x @ W + bias with RoPE and the KV write in its own launch: (q [1, H, D],
    k [1, KVH, D] rotated, v [1, KVH, D]), k and v written into layer_kv at the slot, equal to
    `w4a16_matmul` followed by `rope_store_triton` (arguments as there). None when the product does not
    run the column GEMV without split-K or its column block does not fit the head halves: the caller
    multiplies, then rotates. x: [1, K]."""
    check_w4a16_inputs(x, weight, bias)
    if x.shape[0] != 1 or weight.input_perm is not None:
        return None
    plan = _plan(x, weight, bias)
    o = dict(plan.options)
    from terse.kernels.w4a16_qkv_rope import fits_qkv_rope, launch_qkv_rope

    if plan.kind != "column" or o["split_k"] != 1 or not fits_qkv_rope(weight, num_heads, num_kv_heads, o["block_n"]):
        return None
    return launch_qkv_rope(x, weight, bias, cos_table, sin_table, positions, layer_kv, slot_mapping, num_heads,
                           num_kv_heads, o["block_n"], o["groups"], o["num_warps"], o["num_stages"])


def _plan(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> Plan:
    """The measured plan of x's row-count bucket (measured now when new), or the heuristic one where
    nothing can be timed (interpreter, CUDA graph capture). x: [M >= 1, K], already permuted."""
    bucket = 1 << (x.shape[0] - 1).bit_length()
    key = _plan_key(x.device, bucket, weight, x.dtype)
    plan = _PLANS.get(key)
    if plan is None:
        if interpreting() or torch.cuda.is_current_stream_capturing():
            return heuristic_plan(bucket, weight, _num_sms(x.device))
        plan = _tune(key, x, weight, bias)
    return plan


def _plan_key(device: torch.device, bucket: int, weight: Int4Weight, dtype: torch.dtype) -> PlanKey:
    return (str(device), bucket, weight.out_features, weight.in_features, weight.group_size, weight.zeros is not None,
            str(dtype))


def run_plan(
    plan: Plan, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, prep: RowPrep | None = None
) -> torch.Tensor:
    """Run one plan on an already permuted x (`prep`: x's `RowPrep`, used by the column GEMV)."""
    o = dict(plan.options)
    if plan.kind == "offset":
        from terse.kernels.w4a16_gemv_offset import launch_gemv_offset

        return launch_gemv_offset(x, weight, bias, o["block_n"], o["block_k"], o["split_k"], o["num_warps"])
    if plan.kind == "column":
        from terse.kernels.w4a16_gemv_column import launch_gemv_column

        return launch_gemv_column(x, weight, bias, o["block_n"], o["groups"], o["split_k"], o["num_warps"],
                                  o["num_stages"], prep=_usable(prep, weight))
    if plan.kind == "gemv":
        from terse.kernels.w4a16_gemv import launch_gemv

        return launch_gemv(x, weight, bias, o["block_n"], o["block_k"], o["split_k"], o["num_warps"], o["num_stages"])
    if plan.kind == "dequant":
        from terse.kernels.w4a16_gemm import launch_dequantize

        w = launch_dequantize(weight)  # [K, N]
        return torch.addmm(bias, x, w) if bias is not None else x @ w
    from terse.kernels.w4a16_gemm import launch_gemm

    return launch_gemm(x, weight, bias, o["block_m"], o["block_n"], o["block_k"], o["split_k"], o.get("group_m", 8),
                       o["num_warps"], o["num_stages"], bool(o.get("swap_ab", 0)), bool(o.get("post_scale", 0)))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _split(num_tiles: int, k: int, block_k: int, num_sms: int, waves: int = 2, most: int = 32) -> int:
    """Split-K factor giving about `waves` programs per SM, a power of two, at most `most` and K / BLOCK_K."""
    want = max(1, (waves * num_sms) // max(num_tiles, 1))
    split = 1 << (want.bit_length() - 1)
    return max(1, min(split, most, -(-k // block_k)))


def _offset(block_n: int, block_k: int, warps: int, weight: Int4Weight, num_sms: int, waves: int) -> Plan:
    split = _split(-(-weight.out_features // block_n), weight.in_features, 8, num_sms, waves, most=128)
    return Plan("offset", (("block_n", block_n), ("block_k", block_k), ("split_k", split), ("num_warps", warps)))


def _column(block_n: int, groups: int, warps: int, stages: int, weight: Int4Weight, num_sms: int, waves: int) -> Plan:
    split = _split(-(-weight.out_features // block_n), weight.in_features, groups * weight.group_size, num_sms, waves,
                   most=64)
    return Plan("column", (("block_n", block_n), ("groups", groups), ("split_k", split), ("num_warps", warps),
                           ("num_stages", stages)))


def _gemv(block_n: int, block_k: int, warps: int, stages: int, weight: Int4Weight, num_sms: int, waves: int = 2) -> Plan:
    split = _split(-(-weight.out_features // block_n), weight.in_features, block_k, num_sms, waves)
    return Plan("gemv", (("block_n", block_n), ("block_k", block_k), ("split_k", split),
                         ("num_warps", warps), ("num_stages", stages)))


def _gemm(bm: int, bn: int, bk: int, warps: int, stages: int, weight: Int4Weight, m: int, num_sms: int,
          *, swap: bool = True, waves: int = 2, post_scale: bool = False) -> Plan:
    tiles = -(-m // bm) * -(-weight.out_features // bn)
    split = _split(tiles, weight.in_features, bk, num_sms, waves)
    return Plan("gemm", (("block_m", bm), ("block_n", bn), ("block_k", bk), ("split_k", split),
                         ("num_warps", warps), ("num_stages", stages), ("swap_ab", int(swap)),
                         ("post_scale", int(post_scale))))


# Tile sets from launch-free sweeps at the 8B projection shapes on an H200 (bench/w4a16_sweep.py,
# docs/benchmarks.md): the few shapes within a few percent of the best at every projection.
OFFSET_TILES = ((2048, 8, 4), (1024, 8, 4), (512, 32, 4))
"""(BLOCK_N, BLOCK_K, warps) of the offset GEMV timed for one row of 16-bit activations."""
COLUMN_TILES = ((32, 2, 4, 3), (128, 2, 4, 3), (128, 2, 4, 4), (32, 2, 4, 1), (16, 2, 4, 6), (32, 2, 1, 4),
                (64, 2, 2, 4), (16, 4, 4, 4))
"""(BLOCK_N, GROUPS, warps, stages) of the column GEMV timed for one row of 16-bit activations with a
power-of-two group size. The last three: on an H200 a one-warp 32-column tile ran gate/up in 25.2 us
(128 x 4 warps: 26.8) and down in 15.2 us (15.6), four groups per step q/k/v in 8.9 us (9.4)."""
GEMV_TILES = ((128, 128, 4, 3), (64, 128, 4, 3))
"""(BLOCK_N, BLOCK_K, warps, stages) of the float32 GEMV timed for one row."""
SKINNY_TILES = {16: ((256, 64, 4, 3), (128, 64, 8, 3)),
                32: ((128, 128, 8, 3), (256, 64, 4, 3), (64, 128, 4, 4), (128, 128, 8, 4)),
                64: ((128, 128, 8, 3), (64, 64, 8, 3))}
"""BLOCK_M -> (BLOCK_N, BLOCK_K, warps, stages) of the swapped GEMM timed for up to 64 rows."""


def candidate_plans(bucket: int, weight: Int4Weight, num_sms: int) -> list[Plan]:
    """The plans timed for a row-count bucket (a power of two). Beyond 64 rows dequantize-then-matmul
    is the only one: the dense matmul is compute-bound there and the GEMM measured 5-10x slower."""
    w, s = weight, num_sms
    if bucket == 1:
        plans = [_gemv(bn, bk, wp, st, w, s, waves) for bn, bk, wp, st in GEMV_TILES for waves in (1, 2)]
        if w.scales.dtype in (torch.bfloat16, torch.float16):
            # latency-bound: on the H200 the largest split tried (2 waves) was the fastest at every shape
            plans = [_offset(bn, bk, wp, w, s, waves) for bn, bk, wp in OFFSET_TILES for waves in (1, 2, 4)] + plans
            if w.group_size in COLUMN_GROUP_SIZES:
                plans += [_column(*tile, w, s, waves) for tile in COLUMN_TILES for waves in (1, 2, 4)]
        return list(dict.fromkeys(plans))
    if bucket <= 64:
        bm = max(16, bucket)
        tiles = SKINNY_TILES[bm]
        plans = [_gemm(bm, bn, bk, wp, st, w, bucket, s, waves=waves) for bn, bk, wp, st in tiles for waves in (1, 2, 4)]
        plans.append(_gemm(bm, *tiles[0], w, bucket, s, post_scale=True))
        return list(dict.fromkeys(plans)) + ([Plan("dequant")] if bucket >= 32 else [])
    return [Plan("dequant")]


def heuristic_plan(bucket: int, weight: Int4Weight, num_sms: int) -> Plan:
    """The plan used when nothing was measured (interpreter, CUDA graph capture)."""
    if bucket == 1:
        if weight.scales.dtype in (torch.bfloat16, torch.float16):
            if weight.group_size in COLUMN_GROUP_SIZES:
                return _column(*COLUMN_TILES[1], weight, num_sms, 1)
            return _offset(2048, 8, 4, weight, num_sms, 2)
        return _gemv(128, 128, 4, 3, weight, num_sms)
    if bucket <= 64:
        return _gemm(max(16, bucket), *SKINNY_TILES[max(16, bucket)][0], weight, bucket, num_sms)
    return Plan("dequant")


def _rotating_weights(weight: Int4Weight) -> list[Int4Weight]:
    """`weight` and enough copies of it that timing calls read the weight from memory, not the L2."""
    from terse.kernels.w4a16_timing import rotating_copies

    copies = [weight]
    for _ in range(rotating_copies(weight.nbytes(), weight.qweight.device, most=8) - 1):
        copies.append(Int4Weight(weight.qweight.clone(), weight.scales.clone(),
                                 None if weight.zeros is None else weight.zeros.clone(), weight.group_size))
    return copies


def _tune(key: PlanKey, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> Plan:
    """Time every candidate of the bucket launch-free and keep the fastest; a candidate whose output
    differs from dequantize-then-matmul's beyond the activation dtype's rounding is rejected (a
    miscompiled tile is not a plan)."""
    from terse.kernels.w4a16_timing import eager_ms, graph_ms

    candidates = candidate_plans(key[1], weight, _num_sms(x.device))
    if len(candidates) == 1:
        _PLANS[key] = candidates[0]
        _TIMINGS[key] = [(candidates[0].describe() + " (only candidate, not timed)", float("nan"))]
        return candidates[0]
    reference = run_plan(Plan("dequant"), x, weight, bias).float()
    tolerance = 1e-3 if x.dtype == torch.float32 else 5e-2
    copies = _rotating_weights(weight)
    timings: list[tuple[str, float]] = []
    best: tuple[Plan, float] | None = None
    in_graph = True
    for plan in candidates:
        calls = [lambda p=plan, w=w: run_plan(p, x, w, bias) for w in copies]
        try:
            err = float((run_plan(plan, x, weight, bias).float() - reference).norm() / reference.norm().clamp(min=1e-30))
            if not err <= tolerance:
                timings.append((f"{plan.describe()} (rejected: relative error {err:.2e})", float("nan")))
                continue
            if in_graph:
                try:
                    ms = graph_ms(calls, min_calls=24, replays=5)
                except RuntimeError:  # capture impossible here: eager timing (launch overhead included)
                    in_graph = False
            if not in_graph:
                ms = eager_ms(calls)
        except Exception as exc:  # a tile shape this GPU cannot compile (shared memory, registers) is not a plan
            timings.append((f"{plan.describe()} (failed: {type(exc).__name__}: {str(exc)[-120:]})", float("nan")))
            continue
        timings.append((plan.describe() + ("" if in_graph else " (eager)"), float(ms)))
        if best is None or ms < best[1]:
            best = (plan, float(ms))
    del copies
    if best is None:
        raise RuntimeError(f"no W4A16 plan ran for M bucket {key[1]}, N={key[2]}, K={key[3]}")
    _PLANS[key] = best[0]
    _TIMINGS[key] = timings
    return best[0]
