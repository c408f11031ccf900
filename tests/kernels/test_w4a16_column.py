"""The column GEMV (terse/kernels/w4a16_gemv_column.py) against the dequantized torch reference under
the Triton interpreter: ragged N and K, a short last group, tiles of one and several groups, split-K
slices of whole steps, symmetric and asymmetric, fp16 and bf16."""

from __future__ import annotations

import pytest
import torch

from terse.errors import KernelInputError
from terse.kernels.w4a16 import Plan, candidate_plans, run_plan
from terse.kernels.w4a16_gemv_column import (
    launch_gemv_column,
    launch_gemv_column_norm,
    launch_gemv_column_silu_mul,
    w4a16_gemv_column,
)
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


# -- inputs formed in the kernel: add + RMSNorm, SiLU-and-multiply ----------------------------------------
def _normed(x, residual, g, eps):
    """float32 rms_norm(x + residual) * g with the sum rounded to x's dtype (as torch adds), and that sum."""
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    h32 = h.float()
    return h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps) * g.float(), h


@pytest.mark.parametrize(
    ("k", "n", "group_size", "asym", "block_n", "groups", "dtype", "with_residual"),
    [
        (256, 96, 128, True, 32, 1, torch.bfloat16, True),
        (512, 130, 64, False, 64, 2, torch.float16, True),  # N tail, symmetric
        (200, 40, 32, True, 16, 2, torch.float16, False),  # K tail inside the last group, layer 0 (no residual)
    ],
)
def test_norm_input_matches_norm_then_product(k, n, group_size, asym, block_n, groups, dtype, with_residual):
    gen = torch.Generator().manual_seed(k + n)
    w = random_weight(k, n, group_size, asym, dtype, seed=k)
    x = (3 * torch.randn(1, k, generator=gen)).to(dtype)
    residual = torch.randn(1, k, generator=gen).to(dtype) if with_residual else None
    g = (1 + 0.2 * torch.randn(k, generator=gen)).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if asym else None
    out, stream = launch_gemv_column_norm(x, residual, g, 1e-5, w, bias, block_n, groups, 4, 2)
    normed, h = _normed(x, residual, g, 1e-5)
    assert out.dtype == dtype and out.shape == (1, n)
    assert rel_err(out, reference(normed, w, bias)) < TOL[dtype]
    if dtype == torch.float16:  # the residual stream is bit for bit the separate norm kernel's
        assert torch.equal(stream, h)
    else:  # the interpreter truncates to bfloat16 where the GPU rounds: one unit in the last place
        torch.testing.assert_close(stream, h, rtol=2**-7, atol=0)
    if residual is None:
        assert stream is x


@pytest.mark.parametrize(("k", "n", "split_k", "dtype"), [(256, 96, 1, torch.bfloat16), (200, 40, 3, torch.float16)])
def test_silu_mul_input_equals_the_two_launches(k, n, split_k, dtype):
    from terse.kernels.activation import silu_mul_triton

    w = random_weight(k, n, 32, True, dtype, seed=n)
    gate_up = (3 * torch.randn(1, 2 * k, generator=torch.Generator().manual_seed(5))).to(dtype)
    fused = launch_gemv_column_silu_mul(gate_up, w, None, 32, 2, split_k, 4, 2)
    two = launch_gemv_column(silu_mul_triton(gate_up), w, None, 32, 2, split_k, 4, 2)
    assert torch.equal(fused, two)  # same inputs, same order of sums


def test_norm_input_refuses_split_k():
    w = random_weight(512, 32, 64, True, torch.float16)
    x = torch.randn(1, 512).half()
    with pytest.raises(KernelInputError, match="split_k=2"):
        _launch_split_norm(x, w)


def _launch_split_norm(x, w):
    from terse.kernels.w4a16_gemv_column import INPUT_NORM, _launch

    return _launch(x, w, None, 32, 2, 2, 4, 2, INPUT_NORM, None, torch.ones(512).half(), x, 1e-5)


def test_fused_inputs_follow_the_measured_plan(monkeypatch):
    """The one-launch paths run only where the bucket's plan is the column GEMV (and, for the norm, without
    split-K); otherwise they return None and the caller runs the norm / activation on its own."""
    from terse.kernels import w4a16

    k, n = 256, 64
    w = random_weight(k, n, 64, True, torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    g = torch.ones(k).to(torch.bfloat16)
    gate_up = torch.randn(1, 2 * k).to(torch.bfloat16)
    key = ("cpu", 1, n, k, 64, True, "torch.bfloat16")

    def column(split_k):
        return Plan("column", (("block_n", 32), ("groups", 2), ("split_k", split_k), ("num_warps", 4), ("num_stages", 2)))

    monkeypatch.setitem(w4a16._PLANS, key, column(1))
    fused = w4a16.w4a16_norm_matmul(x, None, g, 1e-5, w)
    assert fused is not None and rel_err(fused[0], reference(_normed(x, None, g, 1e-5)[0], w, None)) < TOL[torch.bfloat16]
    assert w4a16.w4a16_silu_mul_matmul(gate_up, w) is not None
    monkeypatch.setitem(w4a16._PLANS, key, column(2))
    assert w4a16.w4a16_norm_matmul(x, None, g, 1e-5, w) is None  # split-K: no program sees the whole row
    assert w4a16.w4a16_silu_mul_matmul(gate_up, w) is not None
    monkeypatch.setitem(w4a16._PLANS, key, Plan("gemv", (("block_n", 64), ("block_k", 128), ("split_k", 1),
                                                         ("num_warps", 4), ("num_stages", 2))))
    assert w4a16.w4a16_norm_matmul(x, None, g, 1e-5, w) is None
    assert w4a16.w4a16_silu_mul_matmul(gate_up, w) is None
    assert w4a16.w4a16_norm_matmul(torch.randn(2, k).to(torch.bfloat16), None, g, 1e-5, w) is None  # two rows
    with pytest.raises(KernelInputError, match="norm weight"):
        w4a16.w4a16_norm_matmul(x, None, torch.ones(k), 1e-5, w)  # float32 weight for bfloat16 rows
    with pytest.raises(KernelInputError, match="gate_up"):
        w4a16.w4a16_silu_mul_matmul(x, w)  # [1, K], not [1, 2K]
