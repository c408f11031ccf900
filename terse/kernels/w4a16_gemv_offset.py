"""W4A16 GEMV for one 16-bit activation row (batch-1 decode) with offset floats: about half the
instructions per weight of `w4a16_gemv`, whose float32 path is bound by the integer unit on Hopper.

The 4-bit values become floats without an int-to-float conversion or a subtraction per weight: OR-ing
a nibble placed at mantissa bits 12..15 into float32 2048.0 (unit in the last place 2**-12) gives
exactly 2048 + q; one at bits 16..19 of 128.0 gives 128 + q. One word (8 rows of a column) shifted
4 ways puts its even nibbles at bits 12..15 and its odd ones at 16..19, so each weight costs one LOP3
(mask and OR), half a shift and one FMA. The offsets come out per group, once per row of x, not per
weight:

    sum_k x_k (q_k - z) = sum_k x_k f_k - (2048 sum_even x + 128 sum_odd x) - z sum_k x      (k in a group)
    out[n] = sum_groups s[g, n] * (that)

The cancellation costs about 2**-24 * 2048 / 8 relative per word: ~1e-5 on the output, far below the
bfloat16 / float16 rounding of the result, which is why the path serves 16-bit activations only.

Grid: [N / BLOCK_N, split_k]; each program runs whole groups (or a divisor of one) of its K range, a
tile of BLOCK_K / 8 packed rows at a time; `store_tile` adds the split partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.checks import check_device_for_triton, interpreting
from terse.kernels.dependent_launch import launch_options, wait_for_previous_kernel
from terse.kernels.w4a16_layout import Int4Weight, check_w4a16_inputs
from terse.kernels.w4a16_tiles import MAX_SPLIT_TILES, row_launch, store_row
from terse.validation import check_choice


@triton.jit
def _even(v):
    # the nibble at bits 12..15 of v -> 2048 + q
    return ((v & 0xF000) | 0x45000000).to(tl.float32, bitcast=True)


@triton.jit
def _odd(v):
    # the nibble at bits 16..19 of v -> 128 + q
    return ((v & 0xF0000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _x(X, kr, j: tl.constexpr, mask, EVEN: tl.constexpr):
    # x[kr + j] as float32 ([R] rows of the tile)
    if EVEN:
        v = tl.load(X + kr + j)
    else:
        v = tl.load(X + kr + j, mask=mask, other=0.0)
    return v.to(tl.float32)


# One word -> its 8 offset floats in PTX: 4 shifts and 8 LOP3 ((v & mask) | exponent in one instruction).
# Written in Triton, the mask and the OR compile to two LOP3 each (ptxas does not fuse them here): 8 more
# integer instructions per packed word (52 -> 44 per word in the column GEMV's loop, sm_90a).
OFFSET_FLOATS_ASM = tl.constexpr("""{
.reg .b32 a, b, c, d;
shl.b32 a, $8, 12;
shl.b32 b, $8, 4;
shr.u32 c, $8, 4;
shr.u32 d, $8, 12;
lop3.b32 $0, a, 0x0000f000, 0x45000000, 0xea;
lop3.b32 $1, a, 0x000f0000, 0x43000000, 0xea;
lop3.b32 $2, b, 0x0000f000, 0x45000000, 0xea;
lop3.b32 $3, b, 0x000f0000, 0x43000000, 0xea;
lop3.b32 $4, c, 0x0000f000, 0x45000000, 0xea;
lop3.b32 $5, c, 0x000f0000, 0x43000000, 0xea;
lop3.b32 $6, d, 0x0000f000, 0x45000000, 0xea;
lop3.b32 $7, d, 0x000f0000, 0x43000000, 0xea;
}""")


@triton.jit
def offset_floats(words, FAST: tl.constexpr):
    # int32 words -> eight float32 tensors of their shape: nibble j as 2048 + q (j even) or 128 + q (j odd).
    # FAST: the PTX above (CUDA); else plain Triton with the same values (the interpreter).
    if FAST:
        f0, f1, f2, f3, f4, f5, f6, f7 = tl.inline_asm_elementwise(
            OFFSET_FLOATS_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        return (f0.to(tl.float32, bitcast=True), f1.to(tl.float32, bitcast=True),
                f2.to(tl.float32, bitcast=True), f3.to(tl.float32, bitcast=True),
                f4.to(tl.float32, bitcast=True), f5.to(tl.float32, bitcast=True),
                f6.to(tl.float32, bitcast=True), f7.to(tl.float32, bitcast=True))
    else:
        a = words << 12  # nibbles 0, 1 at bits 12..15, 16..19
        b = words << 4  # nibbles 2, 3
        c = words >> 4  # nibbles 4, 5
        d = words >> 12  # nibbles 6, 7
        return _even(a), _odd(a), _even(b), _odd(b), _even(c), _odd(c), _even(d), _odd(d)


@triton.jit
def _fma8(acc, words, x0, x1, x2, x3, x4, x5, x6, x7, FAST: tl.constexpr):
    # acc [R, BN] + sum_j x_j (2048 + q_j or 128 + q_j) over the eight input rows of each packed row
    f0, f1, f2, f3, f4, f5, f6, f7 = offset_floats(words, FAST)
    acc += x0[:, None] * f0
    acc += x1[:, None] * f1
    acc += x2[:, None] * f2
    acc += x3[:, None] * f3
    acc += x4[:, None] * f4
    acc += x5[:, None] * f5
    acc += x6[:, None] * f6
    acc += x7[:, None] * f7
    return acc


@triton.jit
def _group_scale_zero(S, Z, g, offs_n, n_mask, N, HAS_ZEROS: tl.constexpr, EVEN: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    if EVEN:
        s = tl.load(S + g * N + offs_n).to(tl.float32)
    else:
        s = tl.load(S + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        if EVEN:
            z = tl.load(Z + g * N + offs_n).to(tl.float32)
        else:
            z = tl.load(Z + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        z = tl.full([BLOCK_N], 8.0, tl.float32)
    return s, z


@triton.jit(do_not_specialize=["split_k"])
def _w4a16_gemv_offset_kernel(
    X, QW, S, Z, Bias, Out, WS, Locks,
    N, K, K_PER_SPLIT, split_k,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_SPLIT: tl.constexpr, EVEN: tl.constexpr,
    FAST: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_r = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for g0 in range(k_begin, k_end, GROUP_SIZE):  # K_PER_SPLIT is a multiple or a divisor of GROUP_SIZE
        tg = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)  # sum_k x_k f_k of the group
        offset = tl.zeros([BLOCK_K // 8], dtype=tl.float32)  # 2048 sum_even x + 128 sum_odd x
        xsum = tl.zeros([BLOCK_K // 8], dtype=tl.float32)
        for k0 in range(g0, tl.minimum(g0 + GROUP_SIZE, k_end), BLOCK_K):
            kr = k0 + offs_r * 8  # [R] the first input row of each packed row
            ptrs = QW + (k0 // 8 + offs_r).to(tl.int64)[:, None] * N + offs_n[None, :]
            if EVEN:
                words = tl.load(ptrs)  # [R, BN]
            else:
                words = tl.load(ptrs, mask=(kr < K)[:, None] & n_mask[None, :], other=0)
            xm = kr < K
            x0, x1 = _x(X, kr, 0, xm, EVEN), _x(X, kr, 1, xm, EVEN)
            x2, x3 = _x(X, kr, 2, xm, EVEN), _x(X, kr, 3, xm, EVEN)
            x4, x5 = _x(X, kr, 4, xm, EVEN), _x(X, kr, 5, xm, EVEN)
            x6, x7 = _x(X, kr, 6, xm, EVEN), _x(X, kr, 7, xm, EVEN)
            even = (x0 + x2) + (x4 + x6)
            odd = (x1 + x3) + (x5 + x7)
            offset += even * 2048.0 + odd * 128.0
            xsum += even + odd
            tg = _fma8(tg, words, x0, x1, x2, x3, x4, x5, x6, x7, FAST)
        s, z = _group_scale_zero(S, Z, g0 // GROUP_SIZE, offs_n, n_mask, N, HAS_ZEROS, EVEN, BLOCK_N)
        acc += s[None, :] * (tg - offset[:, None] - z[None, :] * xsum[:, None])
    store_row(tl.sum(acc, axis=0), Out, Bias, WS, Locks, offs_n, N, pid_n, pid_k, split_k, HAS_BIAS, USE_SPLIT, BLOCK_N, False, Out, Out, False)


def w4a16_gemv_offset(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None, *,
    block_n: int = 1024, block_k: int = 8, split_k: int = 1, num_warps: int = 4,
) -> torch.Tensor:
    """x: [1, K] bfloat16 or float16 (permuted when weight.input_perm is set: the caller applies it)
    -> [1, N] in x's dtype. `split_k` slices K into about that many ranges of whole groups (or of a
    divisor of the group size, when there are fewer groups than slices)."""
    check_one_16bit_row("w4a16_gemv_offset", x, weight, bias)
    check_choice("block_n", block_n, (64, 128, 256, 512, 1024, 2048, 4096), error=KernelInputError)
    check_choice("block_k", block_k, (8, 16, 32, 64, 128), error=KernelInputError)
    return launch_gemv_offset(x, weight, bias, block_n, block_k, split_k, num_warps)


def fast_offset(x: torch.Tensor) -> bool:
    """Whether the one-row 16-bit GEMVs unpack through PTX (`offset_floats`): on a CUDA GPU, not in the
    interpreter."""
    return x.device.type == "cuda" and not interpreting()


def check_one_16bit_row(name: str, x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> None:
    """The inputs of a one-row 16-bit GEMV (`name` in the messages)."""
    check_w4a16_inputs(x, weight, bias)
    check_device_for_triton(x)
    if x.shape[0] != 1:
        raise KernelInputError(f"{name} takes one row; got M={x.shape[0]} (use w4a16_gemm)")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise KernelInputError(f"{name} takes bfloat16 or float16 x; got {x.dtype} (use w4a16_gemv)")


def split_range(k: int, group_size: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(block_k, K per split) for about `split_k` slices: BLOCK_K divides the group; a slice is whole
    groups, or a divisor of one (a multiple of BLOCK_K) when there are more slices than groups."""
    while group_size % block_k:
        block_k //= 2
    want = -(-k // max(1, split_k))
    if want >= group_size:
        return block_k, -(-want // group_size) * group_size
    per_split = block_k
    while per_split < want or group_size % per_split:
        per_split += block_k
    return block_k, per_split


def launch_gemv_offset(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, block_n: int, block_k: int, split_k: int,
    num_warps: int,
) -> torch.Tensor:
    """`w4a16_gemv_offset` without the input checks (for callers that checked once)."""
    n, k = weight.out_features, weight.in_features
    block_k, k_per_split = split_range(k, weight.group_size, block_k, split_k if triton.cdiv(n, block_n) <= MAX_SPLIT_TILES else 1)
    r = row_launch(x, weight, block_n, k_per_split)
    _w4a16_gemv_offset_kernel[r.grid](
        x, weight.qweight, weight.scales, r.zeros, bias if bias is not None else r.out, r.out, r.workspace, r.locks,
        n, k, k_per_split, r.split_k,
        GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, USE_SPLIT=r.split_k > 1,
        EVEN=n % block_n == 0 and k % weight.group_size == 0, FAST=fast_offset(x), num_warps=num_warps, num_stages=1,
        **launch_options(x),
    )
    return r.out
