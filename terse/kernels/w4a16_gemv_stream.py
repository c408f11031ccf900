"""W4A16 GEMV for one 16-bit activation row that keeps its weight loads in flight: the offset-float
arithmetic of `w4a16_gemv_offset`, with a K loop whose loads do not wait on the previous tile.

The offset GEMV loads one small tile, then stalls on it (memory latency, ~1 us on an H200): a program
has a few KB in flight where the memory system needs tens of KB per SM. Here every loop iteration is
one tile of BLOCK_K input rows (BLOCK_K / 8 packed rows x BLOCK_N columns, 128-bit loads along N) inside
one quantization group (BLOCK_K divides the group size), so each iteration applies its own group's
scale and the loop has no nested group loop; tile addresses depend only on the loop index. Two ways to
keep loads in flight, picked per launch (both are tuner candidates):

    PREFETCH = False   `tl.range(..., num_stages=NUM_STAGES)`: Triton's software pipeliner copies the
                       next NUM_STAGES - 1 tiles asynchronously through shared memory (it pipelines loads
                       that feed no dot only in loops that ask for stages)
    PREFETCH = True    explicit register double-buffering: the loads of tile i + 1 are issued before
                       the arithmetic of tile i

Per tile (rows 8r + j of the tile, g its group, f = 2048 + q or 128 + q as in the offset GEMV):

    acc[r, n] += s[g, n] * (sum_j x_j f_j - (2048 sum_even x + 128 sum_odd x) - z[g, n] sum_j x_j)

Grid: [N / BLOCK_N, split_k]; `store_tile` adds the split partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.w4a16_gemv_offset import (
    _fma8,
    _group_scale_zero,
    check_one_16bit_row,
    fast_offset,
    gemv_launch,
)
from terse.kernels.w4a16_layout import Int4Weight
from terse.kernels.w4a16_tiles import store_row
from terse.validation import check_choice


@triton.jit
def _x_row(X, kr, j: tl.constexpr, rows, MASK_ROWS: tl.constexpr, EVEN: tl.constexpr):
    # x[kr + j] as float32 ([R] rows of the tile; rows past the limit read 0)
    if EVEN:
        if MASK_ROWS:
            v = tl.load(X + kr + j, mask=rows, other=0.0)
        else:
            v = tl.load(X + kr + j)
    else:
        v = tl.load(X + kr + j, mask=rows, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _load_tile(X, QW, k0, k_lim, offs_r, offs_n, n_mask, N, MASK_ROWS: tl.constexpr, EVEN: tl.constexpr):
    # the packed words [R, BN] and x[8r + j] (eight [R] vectors) of the tile starting at input row k0;
    # rows at or past k_lim read 0 (k_lim is K, or the end of the split when prefetching past it)
    kr = k0 + offs_r * 8  # [R]
    rows = kr < k_lim
    ptrs = QW + (k0 // 8 + offs_r).to(tl.int64)[:, None] * N + offs_n[None, :]
    if EVEN:
        if MASK_ROWS:
            words = tl.load(ptrs, mask=rows[:, None], other=0)
        else:
            words = tl.load(ptrs)
    else:
        words = tl.load(ptrs, mask=rows[:, None] & n_mask[None, :], other=0)
    x0, x1 = _x_row(X, kr, 0, rows, MASK_ROWS, EVEN), _x_row(X, kr, 1, rows, MASK_ROWS, EVEN)
    x2, x3 = _x_row(X, kr, 2, rows, MASK_ROWS, EVEN), _x_row(X, kr, 3, rows, MASK_ROWS, EVEN)
    x4, x5 = _x_row(X, kr, 4, rows, MASK_ROWS, EVEN), _x_row(X, kr, 5, rows, MASK_ROWS, EVEN)
    x6, x7 = _x_row(X, kr, 6, rows, MASK_ROWS, EVEN), _x_row(X, kr, 7, rows, MASK_ROWS, EVEN)
    return words, x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _tile_sum(words, x0, x1, x2, x3, x4, x5, x6, x7, s, z, FAST: tl.constexpr):
    # [R, BN] float32: s * (x . (q - z)) over the eight input rows of each packed row; the offsets and
    # zeros start the sum, the eight products are added to them
    even = (x0 + x2) + (x4 + x6)
    odd = (x1 + x3) + (x5 + x7)
    offset = even * 2048.0 + odd * 128.0
    start = -offset[:, None] - z[None, :] * (even + odd)[:, None]
    return s[None, :] * _fma8(start, words, x0, x1, x2, x3, x4, x5, x6, x7, FAST)


@triton.jit(do_not_specialize=["split_k"])
def _w4a16_gemv_stream_kernel(
    X, QW, S, Z, Bias, Out, WS, Locks,
    N, K, K_PER_SPLIT, split_k,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr, EVEN: tl.constexpr,
    PREFETCH: tl.constexpr, NUM_STAGES: tl.constexpr, FAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    if PREFETCH:
        w, x0, x1, x2, x3, x4, x5, x6, x7 = _load_tile(X, QW, k_begin, k_end, offs_r, offs_n, n_mask, N, True, EVEN)
        s, z = _group_scale_zero(S, Z, k_begin // GROUP_SIZE, offs_n, n_mask, N, HAS_ZEROS, EVEN, BLOCK_N)
        for k0 in range(k_begin, k_end, BLOCK_K):
            # issue the next tile's loads (rows past the split read nothing), then compute this one
            nk = k0 + BLOCK_K
            nw, n0, n1, n2, n3, n4, n5, n6, n7 = _load_tile(X, QW, nk, k_end, offs_r, offs_n, n_mask, N, True, EVEN)
            ns, nz = _group_scale_zero(S, Z, tl.minimum(nk, k_end - 1) // GROUP_SIZE, offs_n, n_mask, N, HAS_ZEROS,
                                       EVEN, BLOCK_N)
            acc += _tile_sum(w, x0, x1, x2, x3, x4, x5, x6, x7, s, z, FAST)
            w, x0, x1, x2, x3, x4, x5, x6, x7 = nw, n0, n1, n2, n3, n4, n5, n6, n7
            s, z = ns, nz
    else:
        for k0 in tl.range(k_begin, k_end, BLOCK_K, num_stages=NUM_STAGES):
            w, x0, x1, x2, x3, x4, x5, x6, x7 = _load_tile(X, QW, k0, K, offs_r, offs_n, n_mask, N, False, EVEN)
            s, z = _group_scale_zero(S, Z, k0 // GROUP_SIZE, offs_n, n_mask, N, HAS_ZEROS, EVEN, BLOCK_N)
            acc += _tile_sum(w, x0, x1, x2, x3, x4, x5, x6, x7, s, z, FAST)
    store_row(tl.sum(acc, axis=0), Out, Bias, WS, Locks, offs_n, N, pid_n, pid_k, split_k, HAS_BIAS, USE_SPLIT, BLOCK_N)


def w4a16_gemv_stream(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None, *,
    block_n: int = 256, block_k: int = 128, split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
    prefetch: bool = False,
) -> torch.Tensor:
    """x: [1, K] bfloat16 or float16 (permuted when weight.input_perm is set: the caller applies it)
    -> [1, N] in x's dtype. `split_k` slices K into about that many ranges of whole groups (or of a
    divisor of the group size); BLOCK_K shrinks to a divisor of the group size. `prefetch` double-buffers
    in registers instead of Triton's pipeliner (then `num_stages` is unused)."""
    check_one_16bit_row("w4a16_gemv_stream", x, weight, bias)
    check_choice("block_n", block_n, (32, 64, 128, 256, 512, 1024), error=KernelInputError)
    check_choice("block_k", block_k, (8, 16, 32, 64, 128, 256), error=KernelInputError)
    check_choice("num_stages", num_stages, (1, 2, 3, 4, 5), error=KernelInputError)
    return launch_gemv_stream(x, weight, bias, block_n, block_k, split_k, num_warps, num_stages, prefetch)


def launch_gemv_stream(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, block_n: int, block_k: int, split_k: int,
    num_warps: int, num_stages: int, prefetch: bool,
) -> torch.Tensor:
    """`w4a16_gemv_stream` without the input checks (for callers that checked once)."""
    g = gemv_launch(x, weight, block_n, block_k, split_k)
    stages = 1 if prefetch else num_stages
    _w4a16_gemv_stream_kernel[g.grid](
        x, weight.qweight, weight.scales, g.zeros, bias if bias is not None else g.out, g.out, g.workspace, g.locks,
        weight.out_features, weight.in_features, g.k_per_split, g.split_k,
        GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=g.block_k, USE_SPLIT=g.split_k > 1, EVEN=g.even, PREFETCH=prefetch,
        NUM_STAGES=stages, FAST=fast_offset(x), num_warps=num_warps, num_stages=stages,
    )
    return g.out
