"""W4A16 GEMM for several activation rows (batched decode, prefill), and a dequantization kernel.

`w4a16_gemm`: tiles [BLOCK_M, BLOCK_N] of the output; each K tile of the weight is loaded packed
(BLOCK_K / 8 words per column, each read once), unpacked in registers by `unpack_words` (the 16-bit PTX
path for bfloat16 / float16 on the GPU) to (q - zero) * scale in the activation dtype, rows of a word in
`word_order`, and fed to `tl.dot`; x's columns are taken in the same order, which leaves the product
unchanged. (Unpacking after a load of one word per row would read every word 8 times.) SWAP_AB computes
out^T = W^T x^T: the weight tile is the MMA's first operand, so a Hopper warpgroup MMA covers BLOCK_N >= 64
weight columns whatever the row count (the form for 1-64 rows). POST_SCALE (tiles inside one group)
multiplies the tile's partial sums by the scale instead of every weight. Optional split-K (grid dim 1,
a runtime count) for skinny products whose column tiles alone do not fill the GPU. Tiles are visited in
groups of GROUP_M row tiles so a weight tile is reused from L2 while it is hot (large M).

`w4a16_dequantize`: the whole [K, N] weight in the activation dtype, for "dequantize, then a dense
matmul" (the fast path when M is large enough for the matmul to be compute-bound).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.checks import check_device_for_triton, interpreting
from terse.kernels.dependent_launch import launch_options, wait_for_previous_kernel
from terse.kernels.w4a16_dequant import (
    dequantize_rows,
    group_scale_zero,
    in_word_order,
    load_packed,
    unpack_words,
    word_order,
    word_scale_zero,
)
from terse.kernels.w4a16_layout import Int4Weight, check_w4a16_inputs
from terse.kernels.w4a16_tiles import MAX_SPLIT_TILES, split_k_buffers, store_tile
from terse.validation import check_choice


@triton.jit(do_not_specialize=["M", "split_k"])  # one compiled kernel for every row count and split
def _w4a16_gemm_kernel(
    X, QW, S, Z, Bias, Out, WS, Locks,
    M, N, K, stride_xm, stride_om, K_PER_SPLIT, split_k,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr, POST_SCALE: tl.constexpr, FAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWAP_AB:
        offs_k = tl.arange(0, BLOCK_K)  # x loaded in input order, then permuted (see below)
    else:
        offs_k = word_order(tl.arange(0, BLOCK_K))  # x loaded in the order of the unpacked weights
    offs_r = tl.arange(0, BLOCK_K // 8)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    dt = X.dtype.element_ty
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T = W^T x^T: the weight is operand A
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)  # [BM, BK]
        if SWAP_AB:
            x = in_word_order(x, BLOCK_M, BLOCK_K)  # the order unpack_words leaves the weights in
        rows = k0 // 8 + offs_r
        packed = load_packed(QW, rows, offs_n, n_mask, N, K // 8)  # [R, BN]
        if ONE_GROUP:  # one scale and zero per column for the whole tile
            s, z = group_scale_zero(S, Z, k0 // GROUP_SIZE, offs_n, n_mask, N, HAS_ZEROS, BLOCK_N)  # [BN]
            if SWAP_AB:
                s2, z2 = s[:, None], z[:, None]
            else:
                s2, z2 = s[None, :], z[None, :]
        else:  # tiles span groups: every word with its own group's scale and zero
            s2, z2 = word_scale_zero(S, Z, rows, offs_n, n_mask, N, K, GROUP_SIZE, HAS_ZEROS)  # [R, BN]
            if SWAP_AB:
                s2, z2 = tl.trans(s2), tl.trans(z2)
        if SWAP_AB:
            w = unpack_words(tl.trans(packed), s2, z2, dt, not POST_SCALE, FAST)  # [BN, R, 8]
            w = tl.reshape(w, [BLOCK_N, BLOCK_K])
            if POST_SCALE:  # (q - z) exact in the tile, the scale on the tile's partial sums
                acc += tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION) * s[:, None]
            else:
                acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
        else:
            w = unpack_words(packed, s2, z2, dt, not POST_SCALE, FAST)  # [R, BN, 8]
            w = tl.reshape(tl.permute(w, (0, 2, 1)), [BLOCK_K, BLOCK_N])
            if POST_SCALE:
                acc += tl.dot(x, w, input_precision=DOT_PRECISION) * s[None, :]
            else:
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        out = tl.trans(acc)
    else:
        out = acc
    tile_id = pid_m * num_pid_n + pid_n
    store_tile(out, Out, Bias, WS, Locks, offs_m, offs_n, M, N, stride_om, tile_id, pid_k, split_k,
               HAS_BIAS, USE_SPLIT, BLOCK_M, BLOCK_N, False, Out, Out, False)


@triton.jit
def _w4a16_dequant_kernel(
    QW, S, Z, Out, N, K,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    packed = load_packed(QW, rows, offs_n, n_mask, N, K // 8)
    kk = rows[None, :] * 8 + tl.arange(0, 8)[:, None]  # [8, R]: the weight row held at [j, r]
    w = dequantize_rows(packed, S, Z, kk, offs_n, n_mask, N, K, GROUP_SIZE, HAS_ZEROS)
    out_ptrs = Out + kk.to(tl.int64)[:, :, None] * N + offs_n[None, None, :]
    tl.store(out_ptrs, w.to(Out.dtype.element_ty), mask=(kk < K)[:, :, None] & n_mask[None, None, :])


def w4a16_gemm(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None, *,
    block_m: int = 16, block_n: int = 64, block_k: int = 64, split_k: int = 1, group_m: int = 8,
    num_warps: int = 4, num_stages: int = 3, swap_ab: bool = False,
) -> torch.Tensor:
    """x: [M, K] (already permuted when weight.input_perm is set) -> x @ W + bias: [M, N] in x's dtype.

    `swap_ab` computes out^T = W^T x^T (the weight tile is the MMA's first operand: on Hopper a
    warpgroup MMA of BLOCK_N >= 64 rows whatever the row count; the form for skinny products)."""
    check_w4a16_inputs(x, weight, bias)
    check_device_for_triton(x)
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_choice(name, value, (16, 32, 64, 128, 256), error=KernelInputError)
    return launch_gemm(x, weight, bias, block_m, block_n, block_k, split_k, group_m, num_warps, num_stages, swap_ab)


def launch_gemm(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, block_m: int, block_n: int, block_k: int,
    split_k: int, group_m: int, num_warps: int, num_stages: int, swap_ab: bool = False, post_scale: bool = False,
) -> torch.Tensor:
    """`w4a16_gemm` without the input checks (for callers that checked once)."""
    m, k = x.shape
    n = weight.out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    num_tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split_k = max(1, min(split_k, k_tiles)) if num_tiles <= MAX_SPLIT_TILES else 1
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    workspace, locks = split_k_buffers(x.device, num_tiles * split_k * block_m * block_n if split_k > 1 else 1)
    zeros = weight.zeros if weight.zeros is not None else weight.scales  # unused when HAS_ZEROS is False
    one_group = weight.group_size % block_k == 0
    _w4a16_gemm_kernel[(num_tiles, split_k)](
        x, weight.qweight, weight.scales, zeros, bias if bias is not None else out, out, workspace, locks,
        m, n, k, x.stride(0), out.stride(0), k_per_split, split_k,
        GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
        ONE_GROUP=one_group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        USE_SPLIT=split_k > 1, GROUP_M=group_m, SWAP_AB=swap_ab, POST_SCALE=post_scale and one_group,
        FAST=fast_unpack(x),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages, **launch_options(x),
    )
    return out


def fast_unpack(x: torch.Tensor) -> bool:
    """Whether the kernels unpack with the 16-bit PTX path: 16-bit activations on a CUDA GPU of compute
    capability 8.0 or newer (packed bfloat16 FMAs); float32 and the interpreter take plain Triton."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cuda" or interpreting():
        return False
    return _packed_fma(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.cache
def _packed_fma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def w4a16_dequantize(weight: Int4Weight, *, block_k: int = 64, block_n: int = 128) -> torch.Tensor:
    """The [K, N] weight (rows in stored order) in the scales' dtype."""
    weight.check()
    check_device_for_triton(weight.qweight)
    return launch_dequantize(weight, block_k, block_n)


def launch_dequantize(weight: Int4Weight, block_k: int = 64, block_n: int = 128) -> torch.Tensor:
    """`w4a16_dequantize` without the checks."""
    k, n = weight.in_features, weight.out_features
    out = torch.empty(k, n, dtype=weight.scales.dtype, device=weight.qweight.device)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _w4a16_dequant_kernel[grid](
        weight.qweight, weight.scales, zeros, out, n, k,
        GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, BLOCK_K=block_k, BLOCK_N=block_n,
    )
    return out
