"""The column GEMV (terse/kernels/w4a16_gemv_column.py) against the dequantized torch reference under
the Triton interpreter: ragged N and K, a short last group, tiles of one and several groups, split-K
slices of whole steps, symmetric and asymmetric, fp16 and bf16; the row prep (terse/kernels/row_prep.py)
it takes from the kernel before and the one its SiLU store and the norm write."""

from __future__ import annotations

import pytest
import torch

from terse.errors import KernelInputError
from terse.kernels.activation import silu_mul_triton
from terse.kernels.norm import add_rms_norm_prep_triton, add_rms_norm_triton
from terse.kernels.row_prep import empty_prep, row_prep_reference
from terse.kernels.w4a16 import Plan, candidate_plans, run_plan, w4a16_matmul, w4a16_matmul_silu_mul
from terse.kernels.w4a16_gemv_column import w4a16_gemv_column
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


@pytest.mark.parametrize(
    ("k", "i", "block_n", "groups", "split_k", "bias", "dtype"),
    [
        (256, 48, 32, 1, 1, False, torch.bfloat16),  # I a multiple of the 16-column half blocks
        (512, 50, 32, 2, 1, True, torch.bfloat16),  # I ragged: the last block's tail masked in both halves
        (512, 64, 16, 2, 3, True, torch.float16),  # split-K: the last slice to arrive stores the activation
        (200, 40, 64, 2, 2, False, torch.float16),  # K tail, half blocks wider than I's tail
    ],
)
def test_silu_mul_store_equals_the_activation_of_the_product(k, i, block_n, groups, split_k, bias, dtype):
    # a fused [gate | up] weight (N = 2I): silu(gate) * up in the product's launch, bit for bit what
    # silu_mul_triton makes of the plain product
    w = random_weight(k, 2 * i, 32, True, dtype, seed=k + i)
    x = torch.randn(1, k).to(dtype)
    b = torch.randn(2 * i).to(dtype) if bias else None
    options = dict(block_n=block_n, groups=groups, split_k=split_k)
    fused = w4a16_gemv_column(x, w, b, silu_mul=True, **options)
    assert fused.shape == (1, i) and fused.dtype == dtype
    assert torch.equal(fused, silu_mul_triton(w4a16_gemv_column(x, w, b, **options)))
    with pytest.raises(KernelInputError, match="even N"):
        w4a16_gemv_column(x, random_weight(k, 2 * i + 1, 32, True, dtype), silu_mul=True)


def test_matmul_silu_mul_runs_where_the_plan_is_the_column_gemv():
    w = random_weight(256, 96, 128, True, torch.bfloat16, seed=3)  # group 128, bf16: the column plan
    x = torch.randn(1, 256).to(torch.bfloat16)
    fused = w4a16_matmul_silu_mul(x, w)
    assert fused is not None and torch.equal(fused, silu_mul_triton(w4a16_matmul(x, w)))
    assert w4a16_matmul_silu_mul(torch.randn(2, 256).to(torch.bfloat16), w) is None  # two rows: another plan
    w32 = random_weight(256, 96, 128, True, torch.float32)
    assert w4a16_matmul_silu_mul(torch.randn(1, 256), w32) is None  # float32: the float32 GEMV
    with pytest.raises(KernelInputError):
        w4a16_matmul_silu_mul(torch.randn(1, 128).to(torch.bfloat16), w)  # x does not fit K


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


@pytest.mark.parametrize(
    ("k", "n", "group_size", "asym", "block_n", "groups", "split_k", "dtype"),
    [
        (512, 96, 128, True, 32, 2, 1, torch.bfloat16),  # even K, two groups per step
        (544, 40, 32, False, 16, 4, 2, torch.float16),  # K tail (a step past K), split-K, symmetric
        (200, 64, 64, True, 64, 1, 3, torch.bfloat16),  # K tail inside the last group
    ],
)
def test_a_row_prep_per_packed_row_changes_nothing_per_group_stays_within_rounding(
    k, n, group_size, asym, block_n, groups, split_k, dtype
):
    # x's prep worked out before the product: per packed row the same operations (bit for bit), per group
    # the offsets come off once per group (other rounding, same accuracy against the reference)
    w = random_weight(k, n, group_size, asym, dtype, seed=k + n + 1)
    x = torch.randn(1, k).to(dtype)
    options = dict(block_n=block_n, groups=groups, split_k=split_k)
    plain = w4a16_gemv_column(x, w, **options)
    assert torch.equal(w4a16_gemv_column(x, w, prep=row_prep_reference(x, 8), **options), plain)
    grouped = w4a16_gemv_column(x, w, prep=row_prep_reference(x, group_size), **options)
    want = reference(x, w, None)
    assert rel_err(grouped, want) < TOL[dtype] and rel_err(grouped, plain) < TOL[dtype]
    with pytest.raises(KernelInputError, match="span"):
        w4a16_gemv_column(x, w, prep=row_prep_reference(x, 2 * group_size), **options)
    with pytest.raises(KernelInputError, match="values"):
        w4a16_gemv_column(x, w, prep=row_prep_reference(x[:, :-8], 8), **options)


@pytest.mark.parametrize(("k", "i", "block_n", "split_k"), [(256, 48, 32, 1), (512, 50, 16, 3), (200, 40, 64, 2)])
def test_the_silu_mul_store_writes_its_output_s_prep_per_packed_row(k, i, block_n, split_k):
    # what the down product after gate/up takes: the activation as float32 and its sums per packed row,
    # as row_prep_reference works them out from the stored activation (ragged I: the last row short)
    w = random_weight(k, 2 * i, 32, True, torch.bfloat16, seed=k + i + 2)
    x = torch.randn(1, k).to(torch.bfloat16)
    into = empty_prep(i, 8, x.device)
    act = w4a16_gemv_column(x, w, silu_mul=True, block_n=block_n, split_k=split_k, prep_into=into)
    assert torch.equal(act, w4a16_gemv_column(x, w, silu_mul=True, block_n=block_n, split_k=split_k))
    want = row_prep_reference(act, 8)
    assert torch.equal(into.values, want.values) and torch.equal(into.sums, want.sums)
    with pytest.raises(KernelInputError, match="prep_into"):
        w4a16_gemv_column(x, w, block_n=block_n, prep_into=empty_prep(2 * i, 8, x.device))


@pytest.mark.parametrize(("n", "span", "residual"), [(512, 128, True), (544, 32, True), (544, 8, False), (64, 64, True)])
def test_the_norm_writes_the_next_product_s_row_prep(n, span, residual):
    torch.manual_seed(n + span)
    x, res = (torch.randn(1, n).to(torch.bfloat16) for _ in range(2))
    weight = torch.randn(n).to(torch.bfloat16)
    res = res if residual else None
    out, new_res = add_rms_norm_triton(x, res, weight, 1e-5)
    out2, new_res2, prep = add_rms_norm_prep_triton(x, res, weight, 1e-5, span)
    want = row_prep_reference(out, span)
    assert torch.equal(out2, out) and torch.equal(new_res2, new_res) and prep.span == span
    assert torch.equal(prep.values, want.values)
    assert torch.allclose(prep.sums, want.sums, rtol=1e-6, atol=1e-3)  # group sums: any order of addition
    if span == 8:
        assert torch.equal(prep.sums, want.sums)
    with pytest.raises(ValueError, match="span"):
        add_rms_norm_prep_triton(x, res, weight, 1e-5, 12)
    with pytest.raises(ValueError, match="one row"):
        add_rms_norm_prep_triton(torch.cat((x, x)), None, weight, 1e-5, span)
