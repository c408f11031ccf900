"""`w4a16_matmul`: x @ W + bias for an INT4 weight in terse's layout, on CUDA, through the fastest of
its paths for the shape, measured once:

    gemv      one row (batch-1 decode): split-K GEMV, dequantization in registers (w4a16_gemv)
    gemm      a few to many rows: Triton GEMM on the packed weight, optional split-K (w4a16_gemm)
    dequant   many rows: dequantize the whole weight, then one dense matmul (cuBLAS)

Plans are chosen per (row-count bucket, N, K, group size, scheme, dtype, device): the first product of a
bucket times every candidate (`triton.testing.do_bench`) and keeps the fastest. During CUDA graph
capture nothing is timed: a bucket not yet measured takes the heuristic plan (the engine runs each
graph's batch size eagerly before capturing it, so decode buckets are measured by then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from terse.kernels.checks import interpreting
from terse.kernels.w4a16_layout import Int4Weight, check_w4a16_inputs

PlanKind = Literal["gemv", "gemm", "dequant"]


@dataclass(frozen=True)
class Plan:
    """One way to run a product: a path and its launcher's tile options."""

    kind: PlanKind
    options: tuple[tuple[str, int], ...] = ()

    def describe(self) -> str:
        return self.kind + "".join(f" {k}={v}" for k, v in self.options)


PlanKey = tuple[str, int, int, int, int, bool, str]
_PLANS: dict[PlanKey, Plan] = {}
_TIMINGS: dict[PlanKey, list[tuple[str, float]]] = {}


def chosen_plans() -> dict[PlanKey, tuple[Plan, list[tuple[str, float]]]]:
    """Every plan picked so far with the timings (ms) of the candidates measured for it."""
    return {key: (plan, _TIMINGS.get(key, [])) for key, plan in _PLANS.items()}


def w4a16_matmul(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None, *, check: bool = True
) -> torch.Tensor:
    """x: [M, K] (any row stride, contiguous along K) -> [M, N] in x's dtype. CUDA (or the interpreter).

    `check=False` skips the input checks: for layers that validated their weight once and pass x of the
    right shape and dtype (a decode step's dozens of products pay no Python checks)."""
    if check:
        check_w4a16_inputs(x, weight, bias)
    if weight.input_perm is not None:
        x = x.index_select(1, weight.input_perm)  # act-order checkpoints: stored row r multiplies x[:, perm[r]]
    m = x.shape[0]
    if m == 0:
        return torch.empty(0, weight.out_features, dtype=x.dtype, device=x.device)
    bucket = 1 << (m - 1).bit_length()
    key: PlanKey = (str(x.device), bucket, weight.out_features, weight.in_features, weight.group_size,
                    weight.zeros is not None, str(x.dtype))
    plan = _PLANS.get(key)
    if plan is None:
        if interpreting() or torch.cuda.is_current_stream_capturing():
            return run_plan(heuristic_plan(bucket, weight, _num_sms(x.device)), x, weight, bias)
        plan = _tune(key, x, weight, bias)
    return run_plan(plan, x, weight, bias)


def run_plan(plan: Plan, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """Run one plan on an already permuted x."""
    o = dict(plan.options)
    if plan.kind == "gemv":
        from terse.kernels.w4a16_gemv import launch_gemv

        return launch_gemv(x, weight, bias, o["block_n"], o["block_k"], o["split_k"], o["num_warps"], o["num_stages"])
    if plan.kind == "dequant":
        from terse.kernels.w4a16_gemm import launch_dequantize

        w = launch_dequantize(weight)  # [K, N]
        return torch.addmm(bias, x, w) if bias is not None else x @ w
    from terse.kernels.w4a16_gemm import launch_gemm

    return launch_gemm(x, weight, bias, o["block_m"], o["block_n"], o["block_k"], o["split_k"], o.get("group_m", 8),
                       o["num_warps"], o["num_stages"])


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _split(num_tiles: int, k: int, block_k: int, num_sms: int) -> int:
    """Split-K factor giving about two programs per SM, a power of two, at most 16 and K / BLOCK_K."""
    want = max(1, (2 * num_sms) // max(num_tiles, 1))
    split = 1 << (want.bit_length() - 1)
    return max(1, min(split, 16, -(-k // block_k)))


def _gemv(block_n: int, block_k: int, warps: int, stages: int, weight: Int4Weight, num_sms: int) -> Plan:
    split = _split(-(-weight.out_features // block_n), weight.in_features, block_k, num_sms)
    return Plan("gemv", (("block_n", block_n), ("block_k", block_k), ("split_k", split),
                         ("num_warps", warps), ("num_stages", stages)))


def _gemm(bm: int, bn: int, bk: int, warps: int, stages: int, weight: Int4Weight, m: int, num_sms: int) -> Plan:
    tiles = -(-m // bm) * -(-weight.out_features // bn)
    split = _split(tiles, weight.in_features, bk, num_sms)
    return Plan("gemm", (("block_m", bm), ("block_n", bn), ("block_k", bk), ("split_k", split),
                         ("num_warps", warps), ("num_stages", stages)))


def candidate_plans(bucket: int, weight: Int4Weight, num_sms: int) -> list[Plan]:
    """The plans timed for a row-count bucket (a power of two)."""
    w, s = weight, num_sms
    if bucket == 1:
        return [
            _gemv(64, 128, 4, 3, w, s), _gemv(128, 128, 4, 3, w, s), _gemv(256, 64, 4, 3, w, s),
            _gemv(64, 256, 4, 2, w, s), _gemv(128, 64, 2, 4, w, s), _gemv(32, 128, 2, 3, w, s),
            _gemm(16, 64, 128, 4, 3, w, 1, s),
        ]
    if bucket <= 16:
        return [_gemm(16, bn, bk, 4, st, w, bucket, s) for bn, bk, st in
                ((64, 64, 3), (128, 64, 3), (64, 128, 3), (128, 128, 4), (32, 128, 4))]
    if bucket <= 64:
        return [*(_gemm(bucket, bn, bk, wp, 3, w, bucket, s) for bn, bk, wp in
                  ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8))), Plan("dequant")]
    if bucket <= 256:
        return [*(_gemm(bm, bn, bk, wp, st, w, bucket, s) for bm, bn, bk, wp, st in
                  ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (64, 64, 128, 4, 3), (128, 64, 64, 4, 4))),
                Plan("dequant")]
    return [*(_gemm(bm, bn, bk, wp, st, w, bucket, s) for bm, bn, bk, wp, st in
              ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4))),
            Plan("dequant")]


def heuristic_plan(bucket: int, weight: Int4Weight, num_sms: int) -> Plan:
    """The plan used when nothing was measured (interpreter, CUDA graph capture)."""
    if bucket == 1:
        block_k = next((b for b in (128, 64, 32) if weight.group_size % b == 0), 64)  # one group per tile
        return _gemv(128, block_k, 4, 3, weight, num_sms)
    if bucket <= 64:
        return _gemm(min(bucket, 64) if bucket > 16 else 16, 64, 64, 4, 3, weight, bucket, num_sms)
    if bucket <= 256:
        return _gemm(64, 128, 64, 4, 3, weight, bucket, num_sms)
    return Plan("dequant")


def _tune(key: PlanKey, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> Plan:
    from triton.testing import do_bench

    timings: list[tuple[Plan, float]] = []
    for plan in candidate_plans(key[1], weight, _num_sms(x.device)):
        try:
            ms = do_bench(lambda p=plan: run_plan(p, x, weight, bias), warmup=5, rep=20, return_mode="median")
        except Exception:  # a tile shape this GPU cannot compile (shared memory, registers) is not a plan
            continue
        timings.append((plan, float(ms)))
    if not timings:
        raise RuntimeError(f"no W4A16 plan ran for M bucket {key[1]}, N={key[2]}, K={key[3]}")
    best = min(timings, key=lambda t: t[1])[0]
    _PLANS[key] = best
    _TIMINGS[key] = [(p.describe(), ms) for p, ms in timings]
    return best
