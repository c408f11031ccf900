"""W4A16 GEMM for several activation rows (batched decode, prefill), and a dequantization kernel.

`w4a16_gemm`: tiles [BLOCK_M, BLOCK_N] of the output; each K tile of the weight is loaded packed
(BLOCK_K / 8 words per column, each read once), unpacked in registers to rows in the order (j, r) ->
input row 8r + j, scaled, and fed to `tl.dot` in the activation dtype; x's columns are loaded in the same
permuted order, which leaves the product unchanged. (Unpacking after a load of one word per row would
read every word 8 times and keep 8x the shared memory per pipeline stage.) Optional split-K (grid dim 1)
for skinny products whose column tiles alone do not fill the GPU. Tiles are visited in groups of GROUP_M
row tiles so a weight tile is reused from L2 while it is hot (large M).

`w4a16_dequantize`: the whole [K, N] weight in the activation dtype, for "dequantize, then a dense
matmul" (the fast path when M is large enough for the matmul to be compute-bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.checks import check_device_for_triton
from terse.kernels.w4a16_dequant import dequantize_rows, group_scale_zero, load_packed, nibbles_minus_zero
from terse.kernels.w4a16_layout import Int4Weight, check_w4a16_inputs
from terse.kernels.w4a16_tiles import MAX_SPLIT_TILES, split_k_buffers, store_tile
from terse.validation import check_choice


@triton.jit
def _w4a16_gemm_kernel(
    X, QW, S, Z, Bias, Out, WS, Locks,
    M, N, K, stride_xm, stride_om, K_PER_SPLIT,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
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
    # A K tile is loaded packed ([BLOCK_K / 8, BLOCK_N] words, each read once) and unpacked to rows in
    # the order (j, r) -> k = 8r + j; x's columns are loaded in the same order, so the product is the same.
    PACKED: tl.constexpr = BLOCK_K // 8
    offs_i = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, PACKED)
    k_order = 8 * (offs_i % PACKED) + offs_i // PACKED  # tile row i holds input row k0 + k_order[i]
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + k_order
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)  # [BM, BK]
        packed = load_packed(QW, k0 // 8 + offs_r, offs_n, n_mask, N, K // 8)  # [R, BN]
        if ONE_GROUP:
            s, z = group_scale_zero(S, Z, k0 // GROUP_SIZE, offs_n, n_mask, N, HAS_ZEROS, BLOCK_N)
            w3 = nibbles_minus_zero(packed, z) * s  # [8, R, BN]
        else:
            k3 = k0 + offs_r[None, :] * 8 + tl.arange(0, 8)[:, None]  # [8, R]
            w3 = dequantize_rows(packed, S, Z, k3, offs_n, n_mask, N, K, GROUP_SIZE, HAS_ZEROS)
        w = tl.reshape(w3, [BLOCK_K, BLOCK_N]).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    tile_id = pid_m * num_pid_n + pid_n
    store_tile(acc, Out, Bias, WS, Locks, offs_m, offs_n, M, N, stride_om, tile_id, pid_k,
               HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


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
    num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:
    """x: [M, K] (already permuted when weight.input_perm is set) -> x @ W + bias: [M, N] in x's dtype."""
    check_w4a16_inputs(x, weight, bias)
    check_device_for_triton(x)
    for name, value in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        check_choice(name, value, (16, 32, 64, 128, 256), error=KernelInputError)
    return launch_gemm(x, weight, bias, block_m, block_n, block_k, split_k, group_m, num_warps, num_stages)


def launch_gemm(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, block_m: int, block_n: int, block_k: int,
    split_k: int, group_m: int, num_warps: int, num_stages: int,
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
    _w4a16_gemm_kernel[(num_tiles, split_k)](
        x, weight.qweight, weight.scales, zeros, bias if bias is not None else out, out, workspace, locks,
        m, n, k, x.stride(0), out.stride(0), k_per_split,
        GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
        ONE_GROUP=weight.group_size % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        SPLIT_K=split_k, GROUP_M=group_m, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


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
