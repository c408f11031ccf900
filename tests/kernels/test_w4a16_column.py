"""The column GEMV (terse/kernels/w4a16_gemv_column.py) and the chunked split-K reduction
(terse/kernels/w4a16_tiles.py) against the dequantized torch reference under the Triton interpreter:
ragged N and K, a short last group, tiles of one and several groups, split-K slices of whole steps,
symmetric and asymmetric, fp16 and bf16, the reduction one partial tile at a time and in chunks."""

from __future__ import annotations

import pytest
import torch

from terse.errors import KernelInputError
from terse.kernels import w4a16_tiles
from terse.kernels.w4a16 import Plan, candidate_plans, run_plan
from terse.kernels.w4a16_gemm import w4a16_gemm
from terse.kernels.w4a16_gemv_column import w4a16_gemv_column
from terse.kernels.w4a16_gemv_offset import w4a16_gemv_offset
from terse.kernels.w4a16_tiles import split_chunk
from tests.kernels.helpers import rel_err
from tests.kernels.test_w4a16 import TOL, random_weight, reference


@pytest.mark.parametrize(
    ("k", "n", "group_size", "asym", "block_n", "groups", "split_k", "dtype"),
    [
        (256, 96, 128, True, 32, 1, 1, torch.bfloat16),  # one group per step, N even
        (512, 130, 128, True, 64, 2, 1, torch.bfloat16),  # two groups per step, N tail
        (512, 128, 64, False, 32, 4, 2, torch.float16),  # even, split into whole steps, symmetric
        (200, 40, 32, False, 16, 2, 3, torch.float16),  # K tail inside the last group
        (136, 72, 32, True, 32, 4, 1, torch.bfloat16),  # last group short, step past K
        (1024, 64, 16, True, 64, 8, 4, torch.float16),  # small groups, many steps per slice
    ],
)
def test_column_gemv_matches_reference(k, n, group_size, asym, block_n, groups, split_k, dtype):
    w = random_weight(k, n, group_size, asym, dtype, seed=k + n)
    x = torch.randn(1, k).to(dtype)
    bias = torch.randn(n).to(dtype) if asym else None
    out = w4a16_gemv_column(x, w, bias, block_n=block_n, groups=groups, split_k=split_k)
    assert out.dtype == dtype and out.shape == (1, n)
    assert rel_err(out, reference(x, w, bias)) < TOL[dtype]


def test_column_plans_are_one_row_16_bit_candidates_and_run_through_the_plan_runner():
    w = random_weight(256, 64, 128, True, torch.bfloat16)
    column = [p for p in candidate_plans(1, w, 132) if p.kind == "column"]
    assert column and all({"block_n", "groups", "split_k", "num_warps", "num_stages"} == dict(p.options).keys()
                          for p in column)
    assert not [p for p in candidate_plans(1, random_weight(256, 64, 128, True, torch.float32), 132)
                if p.kind == "column"]
    assert not [p for p in candidate_plans(1, random_weight(240, 64, 48, True, torch.bfloat16), 132)
                if p.kind == "column"]  # group 48: not a power of two
    x = torch.randn(1, 256).to(torch.bfloat16)
    plan = Plan("column", (("block_n", 32), ("groups", 2), ("split_k", 1), ("num_warps", 4), ("num_stages", 2)))
    assert rel_err(run_plan(plan, x, w, None), reference(x, w, None)) < TOL[torch.bfloat16]


def test_column_gemv_rejects_bad_inputs():
    w = random_weight(64, 16, 32, True, torch.float16)
    with pytest.raises(KernelInputError, match="one row"):
        w4a16_gemv_column(torch.randn(2, 64).half(), w)
    with pytest.raises(KernelInputError, match="bfloat16 or float16"):
        w4a16_gemv_column(torch.randn(1, 64), random_weight(64, 16, 32, True, torch.float32))
    with pytest.raises(KernelInputError, match="groups"):
        w4a16_gemv_column(torch.randn(1, 64).half(), w, groups=3)
    with pytest.raises(KernelInputError, match="group sizes"):
        w4a16_gemv_column(torch.randn(1, 48).half(), random_weight(48, 16, 24, True, torch.float16))


def test_split_chunk_is_a_power_of_two_within_the_register_budget():
    assert split_chunk(256, 4) == 16  # 32 floats per thread: 16 [256] partial rows at a time
    assert split_chunk(2048, 4) == 2
    assert split_chunk(32 * 128, 8) == 2
    assert split_chunk(1 << 16, 4) == 1
    assert split_chunk(32, 4) == 16  # at most MAX_SPLIT_CHUNK


@pytest.mark.parametrize("registers", [0, 32])
def test_split_reduction_one_at_a_time_and_chunked_agree_with_the_reference(monkeypatch, registers):
    monkeypatch.setattr(w4a16_tiles, "REDUCE_REGISTERS", registers)
    w = random_weight(512, 72, 32, True, torch.float16, seed=3)
    x1 = torch.randn(1, 512).half()
    out = w4a16_gemv_offset(x1, w, None, block_n=64, block_k=32, split_k=6)  # 6 slices: a masked chunk of 8
    assert rel_err(out, reference(x1, w, None)) < TOL[torch.float16]
    x = torch.randn(20, 512).half()
    out = w4a16_gemm(x, w, None, block_m=16, block_n=32, block_k=32, split_k=5)
    assert rel_err(out, reference(x, w, None)) < TOL[torch.float16]
