"""W4A16 kernel plans at the 8B projection shapes, timed launch-free, next to bf16 `F.linear` (one GPU).

    PYTHONPATH=. python bench/w4a16_sweep.py --out $OUT/w4a16_sweep.json
    PYTHONPATH=. python bench/w4a16_sweep.py --table bench/results/w4a16_sweep.json

Every candidate (tile shape, warps, stages, split-K; the skinny GEMM in both operand orders, the
GEMVs, including the tuner's one-row offset and column GEMVs, dequantize-then-matmul) runs at M = 1 / 8 / 32 / 64 rows on random INT4 weights (group 128,
asymmetric, bf16 scales and zeros) and is checked against the float32 product of the same dequantized
weights, then timed in a CUDA graph of back-to-back calls rotating over weight copies larger than the
L2 cache (terse/kernels/w4a16_timing.py): the cost of the kernel inside the engine's decode graph.
Kernels compile first in parallel worker processes (Triton's disk cache), which also check the
16-bit unpacking on small shapes in float16 and bfloat16, group 32 symmetric and group 128 asymmetric.

`--old-plans FILE` (a quantization GPU result with "plans") times those plans, as the current code
runs them, both launch-free and with `triton.testing.do_bench` (what the plan tuner used to time).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
"""name -> (N, K) of the 8B model's projections (hidden 4096, 32 heads, 8 KV heads, MLP 14336)."""
ROWS = (1, 8, 32, 64)
GROUP = 128
TILES = {  # BLOCK_M -> (BLOCK_N, BLOCK_K, warps, stages) of the swapped GEMM
    16: [(64, 64, 8, 3), (64, 128, 8, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 4, 2),
         (128, 128, 4, 3), (128, 128, 4, 4), (128, 128, 8, 3), (256, 64, 4, 3), (256, 128, 4, 2), (256, 128, 4, 3),
         (256, 128, 8, 3)],
    32: [(64, 64, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 4, 2), (128, 128, 4, 3), (128, 128, 8, 3),
         (256, 64, 4, 3), (256, 128, 8, 2), (256, 128, 8, 3)],
    64: [(64, 64, 8, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 4, 2), (128, 128, 8, 3), (256, 64, 8, 3),
         (256, 128, 8, 2)],
}
UNSWAPPED = [(16, 128, 128, 4, 3), (64, 128, 128, 8, 3)]  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
GEMV = [(64, 128, 4, 3), (128, 128, 4, 3), (32, 128, 2, 3), (256, 64, 4, 3), (128, 64, 2, 4)]
COLUMN = [(bn, g, warps, stages) for bn in (16, 32, 64, 128, 256, 512) for g in (1, 2) for warps in (4, 8)
          for stages in (1, 3, 6)] + [(bn, g, warps, 4) for bn in (16, 32, 64) for g in (2, 4) for warps in (1, 2)]
"""(BLOCK_N, GROUPS, warps, stages) of the column GEMV swept at one row (the tuner's COLUMN_TILES came from it)."""
NUM_SMS = 132


def block_ms(m: int) -> list[int]:
    return [16] if m <= 16 else [32] if m <= 32 else [32, 64]


def splits(m: int, n: int, k: int, bm: int, bn: int, bk: int) -> list[int]:
    """Split-K factors putting about 1, 2 or 4 waves of programs on the GPU (powers of two), and 1."""
    tiles = -(-m // bm) * -(-n // bn)
    out = {1}
    for waves in (1, 2, 4):
        want = waves * NUM_SMS / tiles
        if want > 1:
            out |= {1 << int(math.floor(math.log2(want))), 1 << int(math.ceil(math.log2(want)))}
    return sorted(s for s in out if s <= min(32, k // bk))


def gemm_plans(m: int, n: int, k: int) -> list[dict[str, Any]]:
    plans = []
    for bm in block_ms(m):
        for bn, bk, warps, stages in TILES[bm]:
            for split in splits(m, n, k, bm, bn, bk):
                plans.append({"kind": "gemm", "block_m": bm, "block_n": bn, "block_k": bk, "split_k": split,
                              "num_warps": warps, "num_stages": stages, "swap_ab": 1})
    for bm, bn, bk, warps, stages in UNSWAPPED:
        if (bm == 16) == (m <= 16):
            split = splits(m, n, k, bm, bn, bk)[-2 if len(splits(m, n, k, bm, bn, bk)) > 1 else -1]
            plans.append({"kind": "gemm", "block_m": bm, "block_n": bn, "block_k": bk, "split_k": split,
                          "num_warps": warps, "num_stages": stages, "swap_ab": 0})
    if m == 1:
        for bn, bk, warps, stages in GEMV:
            split = max(1, min(16, 2 * NUM_SMS // -(-n // bn), k // bk))
            plans.append({"kind": "gemv", "block_n": bn, "block_k": bk, "split_k": 1 << (split.bit_length() - 1),
                          "num_warps": warps, "num_stages": stages})
    if m == 1:  # the one-row 16-bit kernels exactly as the tuner times them (offset, column), and a column grid
        plans += [p for p in tuner_plans(1, n, k) if p["kind"] in ("offset", "column")]
        for bn, g, warps, stages in COLUMN:
            for split in sorted({max(1, min(64, waves * NUM_SMS // -(-n // bn))) for waves in (0, 1, 2, 4)}):
                plans.append({"kind": "column", "block_n": bn, "groups": g, "split_k": 1 << (split.bit_length() - 1),
                              "num_warps": warps, "num_stages": stages})
    if m >= 32:
        plans.append({"kind": "dequant"})
    return list({describe(plan): plan for plan in plans}.values())  # the grid repeats some tuner plans


def describe(plan: dict[str, Any]) -> str:
    return " ".join([plan["kind"], *(f"{k}={v}" for k, v in plan.items() if k != "kind")])


def run(plan: dict[str, Any], x: Any, weight: Any) -> Any:
    from terse.kernels.w4a16 import Plan, run_plan

    options = tuple((k, int(v)) for k, v in plan.items() if k != "kind")
    return run_plan(Plan(plan["kind"], options), x, weight, None)


# -- phase 1: compile every kernel in worker processes; check the 16-bit unpacking ---------------------
def compile_job(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    import torch

    from terse.kernels.w4a16_layout import Int4Weight, pack_int4, w4a16_reference

    kind, spec = job
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(1)
    dtype = getattr(torch, spec.get("dtype", "bfloat16"))
    group, asym = spec.get("group", GROUP), spec.get("asym", True)
    k, n = (512, spec.get("n", 384)) if kind == "compile" else (1024, 320)
    q = torch.randint(0, 16, (k, n), device="cuda", generator=gen)
    scales = (torch.rand(k // group, n, device="cuda", generator=gen) * 0.02 + 0.002).to(dtype)
    zeros = torch.randint(0, 16, (k // group, n), device="cuda", generator=gen).to(dtype) if asym else None
    weight = Int4Weight(pack_int4(q), scales, zeros, group)
    m = spec.get("m", 1)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    t0 = time.perf_counter()
    try:
        out = run(spec["plan"], x, weight)
        torch.cuda.synchronize()
    except Exception as exc:
        return {"job": kind, "plan": describe(spec["plan"]), "error": f"{type(exc).__name__}: {str(exc)[-300:]}"}
    w32 = Int4Weight(weight.qweight, weight.scales.float(), None if zeros is None else zeros.float(), group)
    ref = w4a16_reference(x.float(), w32)
    err = float((out.float() - ref).norm() / ref.norm())
    return {"job": kind, "plan": describe(spec["plan"]), "spec": {k_: v for k_, v in spec.items() if k_ != "plan"},
            "rel_err": err, "seconds": time.perf_counter() - t0}


def compile_jobs() -> list[tuple[str, dict[str, Any]]]:
    seen: set[str] = set()
    jobs = []
    for m in ROWS:
        for n, k in SHAPES.values():
            for plan in gemm_plans(m, n, k):
                if plan["kind"] == "dequant":
                    continue
                key = describe({**plan, "split_k": int(plan["split_k"] > 1)})
                if key not in seen:
                    seen.add(key)
                    jobs.append(("compile", {"plan": {**plan, "split_k": 2 if plan["split_k"] > 1 else 1}, "m": m}))
    checks = []
    for dtype in ("bfloat16", "float16"):
        for group, asym in ((128, True), (32, False)):
            for m, swap, bm in ((1, 1, 16), (5, 1, 16), (48, 1, 64), (48, 0, 64)):
                for bk in (64, 128):
                    plan = {"kind": "gemm", "block_m": bm, "block_n": 64, "block_k": bk, "split_k": 2,
                            "num_warps": 4, "num_stages": 3, "swap_ab": swap}
                    checks.append(("check", {"plan": plan, "m": m, "dtype": dtype, "group": group, "asym": asym}))
    return jobs + checks


def tuner_plans(bucket: int, n: int, k: int) -> list[dict[str, Any]]:
    """The plan tuner's candidates for a row bucket at one shape (bf16, group 128, asymmetric) as specs."""
    import torch

    from terse.kernels.w4a16 import candidate_plans
    from terse.kernels.w4a16_layout import Int4Weight

    weight = Int4Weight(torch.zeros(k // 8, n, dtype=torch.int32, device="meta"),
                        torch.zeros(k // GROUP, n, dtype=torch.bfloat16, device="meta"),
                        torch.zeros(k // GROUP, n, dtype=torch.bfloat16, device="meta"), GROUP)
    return [{"kind": plan.kind, **dict(plan.options)} for plan in candidate_plans(bucket, weight, NUM_SMS)]


def precompile_jobs() -> list[tuple[str, dict[str, Any]]]:
    """One compile job per kernel the plan tuner can pick at the 8B shapes (bf16, group 128, asymmetric),
    with the specializations the engine's calls get (the one-row offset kernels both with and without
    ragged edges)."""
    seen: set[str] = set()
    jobs = []
    for n, k in SHAPES.values():
        for bucket in (1, 2, 4, 8, 16, 32, 64, 128):
            for plan in tuner_plans(bucket, n, k):
                spec = dict(plan)
                if "split_k" in spec:
                    spec["split_k"] = 2 if spec["split_k"] > 1 else 1
                for even in ([True, False] if plan["kind"] in ("offset", "column") else [True]):
                    key = describe(spec) + f" even={even}"
                    if key not in seen:
                        seen.add(key)
                        width = spec.get("block_n", 64) * (2 if even else 3) + (0 if even else 64)
                        jobs.append(("compile", {"plan": spec, "m": bucket, "n": width}))
    return jobs


def run_jobs(jobs: list[tuple[str, dict[str, Any]]], workers: int) -> list[dict[str, Any]]:
    """`compile_job` over `jobs` in worker processes; a worker that dies (a compiler crash) fails the jobs
    it leaves unfinished, recorded as errors, instead of hanging the run."""
    from concurrent.futures import ProcessPoolExecutor

    done: list[dict[str, Any]] = []
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [(job, pool.submit(compile_job, job)) for job in jobs]
        for job, future in futures:
            try:
                done.append(future.result())
            except Exception as exc:  # BrokenProcessPool and the like
                done.append({"job": job[0], "plan": describe(job[1]["plan"]), "error": f"{type(exc).__name__}: {exc}"})
    return done


# -- phase 2: time every plan launch-free at the 8B shapes ------------------------------------------------
def random_int4(n: int, k: int, copies: int, gen: Any) -> list[Any]:
    import torch

    from terse.kernels.w4a16_layout import Int4Weight

    out = []
    for _ in range(copies):
        qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32, generator=gen)
        scales = (torch.rand(k // GROUP, n, device="cuda", generator=gen) * 0.02 + 0.002).to(torch.bfloat16)
        zeros = torch.randint(0, 16, (k // GROUP, n), device="cuda", generator=gen).to(torch.bfloat16)
        out.append(Int4Weight(qweight, scales, zeros, GROUP))
    return out


def sweep(result: dict[str, Any], out_path: str) -> None:
    import torch

    from terse.kernels.w4a16_layout import dequantize
    from terse.kernels.w4a16_timing import graph_ms, rotating_copies

    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        probe = random_int4(n, k, 1, gen)[0]
        weights = [probe, *random_int4(n, k, rotating_copies(probe.nbytes(), probe.qweight.device) - 1, gen)]
        w_ref = dequantize(probe, torch.float32)  # [K, N]
        dense = [torch.randn(n, k, device="cuda", generator=gen).to(torch.bfloat16)
                 for _ in range(rotating_copies(n * k * 2, probe.qweight.device))]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            ref = x.float() @ w_ref
            bf16 = graph_ms([lambda d=d, x=x: torch.nn.functional.linear(x, d) for d in dense])
            rows = []
            for plan in gemm_plans(m, n, k):
                try:
                    got = run(plan, x, probe)
                    err = float((got.float() - ref).norm() / ref.norm())
                    ms = graph_ms([lambda w=w, p=plan, x=x: run(p, x, w) for w in weights])
                except Exception as exc:  # a tile this GPU cannot run: recorded, not fatal
                    rows.append({"plan": describe(plan), "error": f"{type(exc).__name__}: {str(exc)[-200:]}"})
                    continue
                rows.append({"plan": describe(plan), "ms": ms, "rel_err": err,
                             "int4_GBps": probe.nbytes() / ms / 1e6})
            ok = [r for r in rows if "ms" in r and r["rel_err"] < 2e-2]
            best = min(ok, key=lambda r: r["ms"]) if ok else None
            result["sweep"][f"{name}/M={m}"] = {"bf16_ms": bf16, "bf16_GBps": n * k * 2 / bf16 / 1e6, "best": best,
                                                "candidates": rows}
            print(f"[sweep] {name} M={m}: bf16 {bf16 * 1e3:.1f} us, best {best and best['plan']} "
                  f"{best and round(best['ms'] * 1e3, 1)} us ({len(rows)} plans)", flush=True)
            write(out_path, result)
        del weights, dense, w_ref
        torch.cuda.empty_cache()


# -- old plans (the code before this sweep's changes, run in its own process) ----------------------------
def old_plans_job(plans_file: str, timing_file: str, out_file: str) -> None:
    """Runs under the old code's PYTHONPATH: its plans at the 8B shapes, do_bench and launch-free. With
    an empty `out_file`, only runs each plan once (compiling it into Triton's disk cache)."""
    import importlib.util

    if str(ROOT) in sys.path:  # the old code, not this tree's
        sys.path.remove(str(ROOT))

    import torch
    from triton.testing import do_bench

    from terse.kernels.w4a16 import Plan, run_plan
    from terse.kernels.w4a16_layout import Int4Weight

    spec = importlib.util.spec_from_file_location("w4a16_timing", timing_file)
    timing = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(timing)  # type: ignore[union-attr]
    saved = json.loads(Path(plans_file).read_text())["plans"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for name, (n, k) in SHAPES.items():
        copies = []
        for _ in range(timing.rotating_copies(n * k // 2, torch.device("cuda"))):
            qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32, generator=gen)
            scales = (torch.rand(k // GROUP, n, device="cuda", generator=gen) * 0.02 + 0.002).to(torch.bfloat16)
            zeros = torch.randint(0, 16, (k // GROUP, n), device="cuda", generator=gen).to(torch.bfloat16)
            copies.append(Int4Weight(qweight, scales, zeros, GROUP))
        for m in ROWS:
            key = str(("cuda:0", m, n, k, GROUP, True, "torch.bfloat16"))
            if key not in saved:
                continue
            words = saved[key]["plan"].split()
            plan = Plan(words[0], tuple((w.split("=")[0], int(w.split("=")[1])) for w in words[1:]))  # type: ignore[arg-type]
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            if not out_file:
                run_plan(plan, x, copies[0], None)
                continue
            bench = do_bench(lambda p=plan, x=x, w=copies[0]: run_plan(p, x, w, None), warmup=5, rep=20, return_mode="median")
            free = timing.graph_ms([lambda w=w, p=plan, x=x: run_plan(p, x, w, None) for w in copies])
            out[f"{name}/M={m}"] = {"plan": saved[key]["plan"], "do_bench_ms": bench, "graph_ms": free}
            print(f"[old] {name} M={m}: {saved[key]['plan']}: do_bench {bench * 1e3:.1f} us, graph {free * 1e3:.1f} us",
                  flush=True)
    if out_file:
        Path(out_file).write_text(json.dumps(out, indent=1))


# -- output --------------------------------------------------------------------------------------------
def write(path: str, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)


def table(result: dict[str, Any]) -> str:
    old = result.get("old_plans", {})
    lines = ["| shape/M | bf16 us | old plan do_bench us | old plan graph us | new best us | int4 GB/s | vs bf16 | err |"
             " new best plan |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in result.get("sweep", {}).items():
        b, o = r["best"], old.get(key, {})
        if b is None:
            lines.append(f"| {key} | {r['bf16_ms'] * 1e3:.1f} | | | none passed | | | | |")
            continue
        lines.append(f"| {key} | {r['bf16_ms'] * 1e3:.1f} | {o.get('do_bench_ms', math.nan) * 1e3:.1f} | "
                     f"{o.get('graph_ms', math.nan) * 1e3:.1f} | {b['ms'] * 1e3:.1f} | {b['int4_GBps']:.0f} | "
                     f"{r['bf16_ms'] / b['ms']:.2f}x | {b['rel_err']:.1e} | {b['plan']} |")
    checks = [c for c in result.get("compile", []) if c["job"] == "check"]
    bad = [c for c in result.get("compile", []) if "error" in c or c.get("rel_err", 0) > 2e-2]
    worst = max((c["rel_err"] for c in checks if "rel_err" in c), default=math.nan)
    lines.append(f"\nchecks: {len(checks)} runs, worst rel err {worst:.2e}; failures/errors: {len(bad)}")
    lines += [f"  {c['plan']} {c.get('spec')}: {c.get('error') or c.get('rel_err')}" for c in bad[:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="")
    parser.add_argument("--table", type=Path)
    parser.add_argument("--old-plans", default="", help="a quantization GPU result whose plans to time as they run")
    parser.add_argument("--old-pythonpath", default=".", help="PYTHONPATH of the code the old plans run under")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--precompile", action="store_true",
                        help="only compile (and check) the kernels the plan tuner can pick at the 8B shapes")
    parser.add_argument("--old-job", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.old_job:
        old_plans_job(*args.old_job)
        return 0
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.precompile:
        t0 = time.perf_counter()
        done = run_jobs(precompile_jobs(), args.workers)
        bad = [d for d in done if "error" in d or d.get("rel_err", 0) > 2e-2]
        print(f"[precompile] {len(done)} kernels in {time.perf_counter() - t0:.0f} s; worst rel err "
              f"{max((d.get('rel_err', 0) for d in done), default=0):.2e}; bad: {bad[:5]}", flush=True)
        write(args.out, {"precompile": done})
        return 0
    import torch
    import triton

    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "triton": triton.__version__, "sweep": {}, "compile": []}
    t0 = time.perf_counter()
    old_cmd = [sys.executable, __file__, "--old-job", args.old_plans, str(ROOT / "terse" / "kernels" / "w4a16_timing.py")]
    old_env = {**os.environ, "PYTHONPATH": args.old_pythonpath}
    warm = subprocess.Popen([*old_cmd, ""], env=old_env) if args.old_plans else None  # compiles meanwhile
    result["compile"] = run_jobs(compile_jobs(), args.workers)
    if warm is not None:
        warm.wait()
    result["compile_s"] = time.perf_counter() - t0
    print(f"[sweep] compiled and checked {len(result['compile'])} kernels in {result['compile_s']:.0f} s", flush=True)
    write(args.out, result)
    sweep(result, args.out)
    if args.old_plans:
        old_out = str(Path(args.out or "w4a16_sweep.json").with_suffix(".old.json"))
        subprocess.run([*old_cmd, old_out], env=old_env, check=False)
        if Path(old_out).exists():
            result["old_plans"] = json.loads(Path(old_out).read_text())
    result["total_s"] = time.perf_counter() - t0
    write(args.out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
