"""W4A16 kernels (GEMV, GEMM with split-K, dequantization) against the dequantized torch reference,
under the Triton interpreter at small shapes: every group size, both schemes, ragged M, K not a
multiple of the block, input permutations.

The interpreter mis-handles bfloat16 `tl.dot` and rounds float32 -> bfloat16 differently from the
GPU's round-to-nearest, so bfloat16 is checked here on the GEMV (no dot) only; the GPU benchmark
(bench/quantization.py) checks every path in bfloat16 on the device.
"""

from __future__ import annotations

import pytest
import torch

from terse.errors import KernelInputError
from terse.kernels.w4a16 import Plan, candidate_plans, heuristic_plan, w4a16_matmul
from terse.kernels.w4a16_gemm import w4a16_dequantize, w4a16_gemm
from terse.kernels.w4a16_gemv import w4a16_gemv
from terse.kernels.w4a16_gemv_offset import split_range, w4a16_gemv_offset
from terse.kernels.w4a16_layout import Int4Weight, dequantize, pack_int4, unpack_int4, w4a16_reference
from terse.kernels.w4a16_tiles import split_k_buffers
from tests.kernels.helpers import rel_err


def random_weight(k: int, n: int, group_size: int, asym: bool, dtype: torch.dtype, seed: int = 0) -> Int4Weight:
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.05 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (groups, n), generator=gen).to(dtype) if asym else None
    return Int4Weight(pack_int4(q), scales, zeros, group_size)


def reference(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 product on the same quantized values."""
    w32 = Int4Weight(w.qweight, w.scales.float(), None if w.zeros is None else w.zeros.float(), w.group_size,
                     w.input_perm)
    return w4a16_reference(x.float(), w32, None if bias is None else bias.float())


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def test_pack_layout_is_eight_rows_per_word_lowest_nibble_first():
    q = torch.arange(16).repeat(2)[:16].view(16, 1) % 16  # rows 0..15 of one column
    packed = pack_int4(q)
    assert packed.shape == (2, 1) and packed.dtype == torch.int32
    expected0 = sum(j << (4 * j) for j in range(8))
    expected1 = sum((8 + j) << (4 * j) for j in range(8)) - (1 << 32)  # top nibble 15 sets the sign bit
    assert packed[:, 0].tolist() == [expected0, expected1]
    assert torch.equal(unpack_int4(packed).long(), q)


def test_dequantize_follows_the_formula_row_by_row():
    w = random_weight(48, 5, 16, asym=True, dtype=torch.float32)
    q = unpack_int4(w.qweight).float()
    dense = dequantize(w)
    for k in (0, 15, 16, 47):
        g = k // 16
        assert torch.equal(dense[k], (q[k] - w.zeros[g]) * w.scales[g])  # type: ignore[index]
    sym = Int4Weight(w.qweight, w.scales, None, 16)
    assert torch.equal(dequantize(sym)[3], (q[3] - 8) * w.scales[0])


@pytest.mark.parametrize(
    ("k", "n", "group_size", "asym", "block_k", "split_k", "dtype"),
    [
        (256, 96, 128, True, 128, 1, torch.float32),  # one group per tile
        (256, 96, 64, False, 64, 2, torch.float32),
        (200, 40, 32, True, 64, 3, torch.float32),  # tiles span groups; K not a multiple of the block
        (136, 72, 32, False, 32, 4, torch.float16),  # last group short
        (512, 130, 128, True, 128, 4, torch.bfloat16),
    ],
)
def test_gemv_matches_reference(k, n, group_size, asym, block_k, split_k, dtype):
    w = random_weight(k, n, group_size, asym, dtype, seed=k + n)
    x = torch.randn(1, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = w4a16_gemv(x, w, bias, block_n=32, block_k=block_k, split_k=split_k)
    assert out.dtype == dtype and out.shape == (1, n)
    assert rel_err(out, reference(x, w, bias)) < TOL[dtype]


@pytest.mark.parametrize(
    ("k", "n", "group_size", "asym", "block_n", "block_k", "split_k", "dtype"),
    [
        (256, 96, 128, True, 64, 8, 1, torch.bfloat16),  # one program per column block, two groups
        (512, 130, 128, True, 128, 32, 8, torch.bfloat16),  # N tail, slices shorter than a group
        (200, 40, 32, False, 64, 16, 3, torch.float16),  # K tail inside the last group, symmetric
        (136, 72, 32, True, 64, 8, 4, torch.float16),  # last group short
    ],
)
def test_offset_gemv_matches_reference(k, n, group_size, asym, block_n, block_k, split_k, dtype):
    w = random_weight(k, n, group_size, asym, dtype, seed=k + n)
    x = torch.randn(1, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    out = w4a16_gemv_offset(x, w, bias, block_n=block_n, block_k=block_k, split_k=split_k)
    assert out.dtype == dtype and out.shape == (1, n)
    assert rel_err(out, reference(x, w, bias)) < TOL[dtype]


def test_offset_split_ranges_are_whole_groups_or_divisors_of_one():
    assert split_range(4096, 128, 8, 4) == (8, 1024)
    assert split_range(14336, 128, 8, 32) == (8, 512)  # 448 rounded up to whole groups
    assert split_range(4096, 128, 8, 64) == (8, 64)  # more slices than groups: half a group each
    assert split_range(4096, 32, 64, 1) == (32, 4096)  # BLOCK_K shrinks to divide the group
    with pytest.raises(KernelInputError, match="bfloat16 or float16"):
        w4a16_gemv_offset(torch.randn(1, 64), random_weight(64, 16, 32, True, torch.float32))


@pytest.mark.parametrize(
    ("m", "k", "n", "group_size", "asym", "block_m", "block_k", "split_k", "dtype"),
    [
        (1, 256, 64, 128, True, 16, 64, 2, torch.float32),
        (5, 200, 40, 32, False, 16, 64, 3, torch.float32),  # ragged M, tiles span groups, K tail
        (17, 192, 96, 64, True, 16, 32, 1, torch.float16),  # M over one row tile
        (33, 136, 64, 32, True, 32, 32, 2, torch.float16),  # short last group, split-K
        (40, 128, 48, 128, False, 32, 128, 1, torch.float32),
    ],
)
@pytest.mark.parametrize("swap_ab", [False, True])
def test_gemm_matches_reference(m, k, n, group_size, asym, block_m, block_k, split_k, dtype, swap_ab):
    w = random_weight(k, n, group_size, asym, dtype, seed=m + k)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if m % 2 else None
    out = w4a16_gemm(x, w, bias, block_m=block_m, block_n=32, block_k=block_k, split_k=split_k, swap_ab=swap_ab)
    assert out.shape == (m, n)
    assert rel_err(out, reference(x, w, bias)) < TOL[dtype]


def test_split_k_counters_reset_after_every_launch():
    w = random_weight(256, 64, 64, True, torch.float32)
    x = torch.randn(3, 256)
    first = w4a16_gemm(x, w, block_m=16, block_n=16, block_k=32, split_k=4)
    _, locks = split_k_buffers(x.device, 1)
    assert int(locks.abs().sum()) == 0
    second = w4a16_gemm(x, w, block_m=16, block_n=16, block_k=32, split_k=4)
    assert torch.equal(first, second)  # partial sums are added in a fixed order: deterministic


@pytest.mark.parametrize(("group_size", "asym", "dtype"), [(32, True, torch.float32), (128, False, torch.float16)])
def test_dequantize_kernel_equals_torch(group_size, asym, dtype):
    w = random_weight(200, 72, group_size, asym, dtype)
    assert torch.equal(w4a16_dequantize(w, block_k=64, block_n=32), dequantize(w))


def test_matmul_entry_applies_the_input_permutation():
    k, n = 128, 32
    base = random_weight(k, n, 32, True, torch.float32)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3))
    w = Int4Weight(base.qweight, base.scales, base.zeros, 32, perm)
    x = torch.randn(4, k)
    expected = x[:, perm] @ dequantize(base)
    assert rel_err(w4a16_matmul(x, w), expected) < 1e-5
    assert rel_err(w4a16_reference(x, w), expected) < 1e-5
    assert w4a16_matmul(x[:0], w).shape == (0, n)


def test_heuristic_plans_by_rows():
    w = random_weight(256, 64, 128, True, torch.float16)
    assert heuristic_plan(1, w, 132).kind == "column"
    assert heuristic_plan(1, random_weight(240, 64, 48, True, torch.float16), 132).kind == "offset"  # group 48
    assert heuristic_plan(1, random_weight(256, 64, 128, True, torch.float32), 132).kind == "gemv"
    eight = heuristic_plan(8, w, 132)
    assert eight.kind == "gemm" and dict(eight.options)["swap_ab"] == 1 and dict(eight.options)["block_m"] == 16
    assert heuristic_plan(32, w, 132).kind == "gemm"
    assert heuristic_plan(4096, w, 132).kind == "dequant"


def test_candidate_plans_by_rows_and_dtype():
    bf16 = random_weight(256, 64, 128, True, torch.bfloat16)
    one = candidate_plans(1, bf16, 132)
    assert {p.kind for p in one} == {"offset", "column", "gemv"} and len(one) == len(set(one))
    assert {p.kind for p in candidate_plans(1, random_weight(256, 64, 128, True, torch.float32), 132)} == {"gemv"}
    eight = candidate_plans(8, bf16, 132)
    assert all(p.kind == "gemm" and dict(p.options)["swap_ab"] == 1 for p in eight)
    assert candidate_plans(32, bf16, 132)[-1].kind == "dequant"
    assert candidate_plans(256, bf16, 132) == [Plan("dequant")]  # one candidate: taken without timing


def test_launchers_reject_bad_inputs():
    w = random_weight(64, 16, 32, True, torch.float32)
    with pytest.raises(KernelInputError, match="expected \\[M, 64\\]"):
        w4a16_gemm(torch.randn(2, 63), w)
    with pytest.raises(KernelInputError, match="scales are torch.float32"):
        w4a16_gemm(torch.randn(2, 64).half(), w)
    with pytest.raises(KernelInputError, match="one row"):
        w4a16_gemv(torch.randn(2, 64), w)
    with pytest.raises(KernelInputError, match="scales has shape"):
        Int4Weight(w.qweight, w.scales[:1], None, 16).check()
    with pytest.raises(KernelInputError, match="multiple of 8"):
        pack_int4(torch.zeros(12, 3, dtype=torch.int64))
