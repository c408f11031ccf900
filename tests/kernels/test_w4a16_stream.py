"""The streaming offset GEMV (terse/kernels/w4a16_gemv_stream.py) against the dequantized torch
reference under the Triton interpreter: both ways of keeping loads in flight (the pipelined
`tl.range` loop and register double-buffering), every tail (N, K inside the last group, a short last
group), split-K slices of whole groups and of part of one, symmetric and asymmetric, fp16 and bf16."""

from __future__ import annotations

import pytest
import torch

from terse.errors import KernelInputError
from terse.kernels.w4a16 import Plan, candidate_plans, run_plan
from terse.kernels.w4a16_gemv_stream import w4a16_gemv_stream
from tests.kernels.helpers import rel_err
from tests.kernels.test_w4a16 import TOL, random_weight, reference


@pytest.mark.parametrize(
    ("k", "n", "group_size", "asym", "block_n", "block_k", "split_k", "dtype"),
    [
        (256, 96, 128, True, 32, 128, 1, torch.bfloat16),  # one tile per group, N tail
        (512, 130, 128, True, 64, 32, 8, torch.bfloat16),  # slices shorter than a group, N tail
        (512, 128, 64, False, 64, 128, 2, torch.float16),  # EVEN; BLOCK_K shrinks to the group
        (512, 128, 128, True, 64, 32, 8, torch.bfloat16),  # EVEN, slices of half a group
        (200, 40, 32, False, 64, 16, 3, torch.float16),  # K tail inside the last group, symmetric
        (136, 72, 32, True, 32, 64, 4, torch.float16),  # last group short
    ],
)
@pytest.mark.parametrize(("prefetch", "num_stages"), [(False, 3), (True, 1)])
def test_stream_gemv_matches_reference(k, n, group_size, asym, block_n, block_k, split_k, dtype, prefetch, num_stages):
    w = random_weight(k, n, group_size, asym, dtype, seed=k + n)
    x = torch.randn(1, k).to(dtype)
    bias = torch.randn(n).to(dtype) if asym else None
    out = w4a16_gemv_stream(x, w, bias, block_n=block_n, block_k=block_k, split_k=split_k,
                            num_stages=num_stages, prefetch=prefetch)
    assert out.dtype == dtype and out.shape == (1, n)
    assert rel_err(out, reference(x, w, bias)) < TOL[dtype]


def test_stream_plans_are_one_row_16_bit_candidates_and_run_through_the_plan_runner():
    w = random_weight(256, 64, 128, True, torch.bfloat16)
    stream = [p for p in candidate_plans(1, w, 132) if p.kind == "stream"]
    assert stream and all({"num_stages", "prefetch", "split_k"} <= dict(p.options).keys() for p in stream)
    assert not [p for p in candidate_plans(1, random_weight(256, 64, 128, True, torch.float32), 132)
                if p.kind == "stream"]
    x = torch.randn(1, 256).to(torch.bfloat16)
    plan = Plan("stream", (("block_n", 32), ("block_k", 64), ("split_k", 2), ("num_warps", 4), ("num_stages", 2),
                           ("prefetch", 0)))
    assert rel_err(run_plan(plan, x, w, None), reference(x, w, None)) < TOL[torch.bfloat16]


def test_stream_gemv_rejects_bad_inputs():
    w = random_weight(64, 16, 32, True, torch.float16)
    with pytest.raises(KernelInputError, match="one row"):
        w4a16_gemv_stream(torch.randn(2, 64).half(), w)
    with pytest.raises(KernelInputError, match="bfloat16 or float16"):
        w4a16_gemv_stream(torch.randn(1, 64), random_weight(64, 16, 32, True, torch.float32))
    with pytest.raises(KernelInputError, match="num_stages"):
        w4a16_gemv_stream(torch.randn(1, 64).half(), w, num_stages=9)
