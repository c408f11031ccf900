"""W4A16 GEMV for one activation row (batch-1 decode): split-K, dequantization in registers.

Each program owns BLOCK_N output columns and one slice of K (grid: [N / BLOCK_N, split_k]). A K tile
loads BLOCK_K / 8 packed words per column once and unpacks them as [8, BLOCK_K / 8, BLOCK_N] (row 8r + j
at [j, r]); x is loaded in the same order, so the tile's products reduce over both leading axes with no
reshuffle. When the tile lies inside one quantization group (GROUP_SIZE % BLOCK_K == 0, ONE_GROUP) the
scale multiplies partial sums over 8 rows instead of every weight:

    acc[r, n] += scale[g, n] * sum_j x[8r + j] * (q[8r + j, n] - zero[g, n])     out[n] = sum_r acc[r, n]

Several programs share a column block under split-K; `store_tile` adds their partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.checks import check_device_for_triton
from terse.kernels.dependent_launch import launch_options, wait_for_previous_kernel
from terse.kernels.w4a16_dequant import dequantize_rows, group_scale_zero, load_packed, nibbles_minus_zero
from terse.kernels.w4a16_layout import Int4Weight, check_w4a16_inputs
from terse.kernels.w4a16_tiles import row_launch, store_row, whole_steps_per_split
from terse.validation import check_choice


@triton.jit(do_not_specialize=["split_k"])
def _w4a16_gemv_kernel(
    X, QW, S, Z, Bias, Out, WS, Locks,
    N, K, K_PER_SPLIT, split_k,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_K // 8)
    offs_j = tl.arange(0, 8)
    num_words = K // 8
    # per-(packed row, column) partial sums: the reduction over rows crosses threads, so it runs once
    # after the loop instead of every tile
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        packed = load_packed(QW, k0 // 8 + offs_r, offs_n, n_mask, N, num_words)  # [R, BN]
        kk = k0 + offs_r[None, :] * 8 + offs_j[:, None]  # [8, R]: the input row held at [j, r]
        x = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
        if ONE_GROUP:
            s, z = group_scale_zero(S, Z, k0 // GROUP_SIZE, offs_n, n_mask, N, HAS_ZEROS, BLOCK_N)
            w = nibbles_minus_zero(packed, z)  # [8, R, BN]; the scale is applied once, after the sum
            acc += tl.sum(x[:, :, None] * w, axis=0) * s[None, :]
        else:
            w = dequantize_rows(packed, S, Z, kk, offs_n, n_mask, N, K, GROUP_SIZE, HAS_ZEROS)
            acc += tl.sum(x[:, :, None] * w, axis=0)
    store_row(tl.sum(acc, axis=0), Out, Bias, WS, Locks, offs_n, N, pid_n, pid_k, split_k, HAS_BIAS, USE_SPLIT, BLOCK_N, False, Out, Out, False)


def w4a16_gemv(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None, *,
    block_n: int = 128, block_k: int = 128, split_k: int = 1, num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:
    """x: [1, K] (a permuted x when weight.input_perm is set: the caller applies it) -> [1, N] in x's dtype.

    `split_k` slices K into that many ranges of whole BLOCK_K tiles (fewer when K is short)."""
    check_w4a16_inputs(x, weight, bias)
    check_device_for_triton(x)
    if x.shape[0] != 1:
        raise KernelInputError(f"w4a16_gemv takes one row; got M={x.shape[0]} (use w4a16_gemm)")
    check_choice("block_n", block_n, (16, 32, 64, 128, 256, 512), error=KernelInputError)
    check_choice("block_k", block_k, (16, 32, 64, 128, 256, 512), error=KernelInputError)
    return launch_gemv(x, weight, bias, block_n, block_k, split_k, num_warps, num_stages)


def launch_gemv(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, block_n: int, block_k: int, split_k: int,
    num_warps: int, num_stages: int,
) -> torch.Tensor:
    """`w4a16_gemv` without the input checks (for callers that checked once)."""
    n, k = weight.out_features, weight.in_features
    k_per_split = whole_steps_per_split(k, block_k, split_k, triton.cdiv(n, block_n))
    r = row_launch(x, weight, block_n, k_per_split)
    _w4a16_gemv_kernel[r.grid](
        x, weight.qweight, weight.scales, r.zeros, bias if bias is not None else r.out, r.out, r.workspace, r.locks,
        n, k, k_per_split, r.split_k,
        GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
        ONE_GROUP=weight.group_size % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, USE_SPLIT=r.split_k > 1,
        num_warps=num_warps, num_stages=num_stages, **launch_options(x),
    )
    return r.out
