"""W4A16 GEMV for one 16-bit activation row over narrow column blocks and whole quantization groups:
the offset-float arithmetic of `w4a16_gemv_offset`, with tiles sized for memory traffic rather than
for one group.

The offset GEMV gives each program a wide column block (512-2048 words) and one small tile of K per step,
so a one-row product needs split-K over 8-64 programs per column block to fill the GPU, and each program
streams little before it has to write its partial sums and meet the others. Here a program owns BLOCK_N
columns (16-128 packed words) and steps through K by GROUPS whole quantization groups at a time, a
[GROUPS, GROUP_SIZE / 8, BLOCK_N] tile of packed words (several KB, 128-bit loads along N) whose loads
Triton's pipeliner keeps NUM_STAGES - 1 tiles ahead. Narrow blocks make enough programs without split-K
for wide products (gate/up, the LM head); split-K stays available for narrow ones. A packed row's eight
inputs are contiguous in x and come in one 16-byte load; words unpack through `offset_floats` (PTX on
the GPU). Per tile (g a group of the tile, r a packed row in it, f = 2048 + q or 128 + q):

    acc[g, r, n] += s[g, n] * (sum_j x_j f_j - (2048 sum_even x + 128 sum_odd x) - z[g, n] sum_j x_j)

Group sizes are powers of two from 16 to 512 (the tile's middle axis is a `tl.arange`); a short last
group and ragged edges are masked. Grid: [N / BLOCK_N, split_k]; `store_row` adds split partial sums.

Under programmatic dependent launch (`dependent_launch`) the programs start while the kernel before
them (a norm, attention's merge) still runs: before waiting for it they ask the L2 for the first rows
of their weight range (`PREFETCH_BYTES` in all), which does not depend on that kernel.

`silu_mul=True` (a fused [gate | up] weight, N = 2I): a program's block holds BLOCK_N / 2 gate columns
and the matching up columns N / 2 further, and the store writes silu(gate) * up, [1, I], rounded as
`silu_mul_triton` rounds after the plain product (bit-identical); that product lets the next kernel (the
down product) launch only after its loop (`LATE_LAUNCH`).
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.dependent_launch import launch_next_kernel, launch_options, wait_for_previous_kernel
from terse.kernels.row_prep import PACKED_ROW, RowPrep
from terse.kernels.w4a16 import COLUMN_GROUP_SIZES as GROUP_SIZES  # GROUP_SIZE / 8 must be a power of two
from terse.kernels.w4a16_gemv_offset import check_one_16bit_row, fast_offset, offset_floats
from terse.kernels.w4a16_layout import Int4Weight
from terse.kernels.w4a16_tiles import row_launch, store_row, whole_steps_per_split
from terse.validation import check_choice


@triton.jit
def _x_rows(X, kr, rows, GROUPS: tl.constexpr, ROWS: tl.constexpr, MASKED: tl.constexpr):
    # x[kr + j] for j = 0..7 as eight float32 [G, R, 1] tensors: one 16-byte load per packed row (its
    # eight inputs are contiguous), then split in registers; rows past the tile's limit read 0
    ptrs = X + kr[:, :, None] + tl.arange(0, 8)[None, None, :]
    if MASKED:
        xt = tl.load(ptrs, mask=rows[:, :, None], other=0.0).to(tl.float32)  # [G, R, 8]
    else:
        xt = tl.load(ptrs).to(tl.float32)
    xa, xb = tl.split(tl.reshape(xt, [GROUPS, ROWS, 4, 2]))  # x0 x2 x4 x6 | x1 x3 x5 x7
    xa0, xa1 = tl.split(tl.reshape(xa, [GROUPS, ROWS, 2, 2]))  # x0 x4 | x2 x6
    xb0, xb1 = tl.split(tl.reshape(xb, [GROUPS, ROWS, 2, 2]))  # x1 x5 | x3 x7
    x0, x4 = tl.split(xa0)
    x2, x6 = tl.split(xa1)
    x1, x5 = tl.split(xb0)
    x3, x7 = tl.split(xb1)
    return (x0[:, :, None], x1[:, :, None], x2[:, :, None], x3[:, :, None],
            x4[:, :, None], x5[:, :, None], x6[:, :, None], x7[:, :, None])


@triton.jit
def _fma8_tile(acc, words, x0, x1, x2, x3, x4, x5, x6, x7, FAST: tl.constexpr):
    # acc [G, R, BN] + sum_j x_j (2048 + q_j or 128 + q_j); x_j [G, R, 1]
    f0, f1, f2, f3, f4, f5, f6, f7 = offset_floats(words, FAST)
    acc += x0 * f0
    acc += x1 * f1
    acc += x2 * f2
    acc += x3 * f3
    acc += x4 * f4
    acc += x5 * f5
    acc += x6 * f6
    acc += x7 * f7
    return acc


PREFETCH_BYTES = 2 << 20
"""Bytes of packed weight a dependent-launched column GEMV asks the L2 to fetch before it waits for the
kernel before it (the first rows of every program's range), spread over its programs; 0: none. More
than the few microseconds of the kernel before a product can fetch only competes with the product
before that: on an H200 the INT4 8B engine's batch-1 decode graph was fastest at 2 MB, slower at 8 MB
(docs/benchmarks.md, bench/decode_profile.py --parts launch)."""


LateLaunch = Literal["silu_mul", "all", "none"]
LATE_LAUNCH: LateLaunch = "silu_mul"
"""Which column GEMVs let the next kernel launch only after their main loop: "silu_mul" (the gate/up
product with the activation, which the down product follows directly), "all" or "none" (each lets it
launch once it waited). A product's programs waiting beside another product's slow it: on an H200 the
decode graph ran 2.43 ms when down launched at once after gate/up, 2.21 ms when it launched after
gate/up's loop (bench/decode_profile.py --parts launch)."""


@triton.jit
def column_block(pid_n, N, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr, PAIR_HALF: tl.constexpr):
    # the program's weight columns [BLOCK_N], which are inside the product, and where its runs of
    # contiguous columns start: (offs_n, n_mask, first run's start, the second's distance from it).
    #   PAIRS 0: BLOCK_N columns in one run
    #   PAIRS 1: BLOCK_N / 2 gate columns, then the matching up columns N / 2 further (gate/up)
    #   PAIRS 2: BLOCK_N / 2 columns of a head's first half, then the matching ones PAIR_HALF further
    #            (RoPE's halves; heads of 2 PAIR_HALF columns, PAIR_HALF a multiple of BLOCK_N / 2)
    if PAIRS == 0:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_n, offs_n < N, pid_n * BLOCK_N, 0
    else:
        RUN: tl.constexpr = BLOCK_N // 2
        pair = pid_n * RUN + tl.arange(0, BLOCK_N) % RUN  # index among the N / 2 first-half columns
        second = tl.arange(0, BLOCK_N) // RUN  # 0: first half, 1: second
        if PAIRS == 1:
            return second * (N // 2) + pair, pair < N // 2, pid_n * RUN, N // 2
        else:  # a block stays inside one head half: its first run starts at one column (written so that
            # Triton sees runs of RUN contiguous, aligned columns and loads them 16 bytes at a time)
            start = tl.multiple_of((pid_n * RUN // PAIR_HALF) * (2 * PAIR_HALF) + (pid_n * RUN) % PAIR_HALF, RUN)
            return start + second * PAIR_HALF + tl.arange(0, BLOCK_N) % RUN, pair < N // 2, start, PAIR_HALF


@triton.jit
def prefetch_l2(QW, pid_k, K_PER_SPLIT, K, N, run_start, run_gap, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                PAIRS: tl.constexpr):
    # one L2 prefetch per 128-byte line of this program's first ROWS packed rows (its column runs, from
    # `column_block`); rows past the program's range and columns past N are clamped onto the last valid
    # word (a repeated prefetch)
    RUN: tl.constexpr = BLOCK_N // 2 if PAIRS > 0 else BLOCK_N
    LINES: tl.constexpr = (RUN + 31) // 32  # per run
    RUNS: tl.constexpr = 2 if PAIRS > 0 else 1
    line = tl.arange(0, RUNS * LINES)
    cols = tl.minimum(run_start + (line // LINES) * run_gap + (line % LINES) * 32, N - 1)
    row_end = tl.minimum((pid_k + 1) * (K_PER_SPLIT // 8), K // 8)
    rows = tl.minimum(pid_k * (K_PER_SPLIT // 8) + tl.arange(0, ROWS), row_end - 1).to(tl.int64)
    addr = (QW + rows[:, None] * N + cols[None, :]).to(tl.int64, bitcast=True)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def column_dot(
    X, XP, SP, QW, S, Z, N, K, K_PER_SPLIT, pid_k, offs_n, n_mask,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, FAST: tl.constexpr,
    PREP_SPAN: tl.constexpr,
):
    # x's product with the columns offs_n over the program's K range -> float32 [BLOCK_N]. PREP_SPAN 0: from
    # x itself; 8: x as float32 (XP) and its sums per packed row (SP), the same operations; GROUP_SIZE: per
    # group sums, whose offsets come off once per group and column (gacc) instead of once per word
    ROWS: tl.constexpr = GROUP_SIZE // 8  # packed rows per group
    offs_g = tl.arange(0, GROUPS)
    offs_r = tl.arange(0, ROWS)
    acc = tl.zeros([GROUPS, ROWS, BLOCK_N], dtype=tl.float32)
    gacc = tl.zeros([GROUPS, BLOCK_N], dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in tl.range(k_begin, k_end, GROUPS * GROUP_SIZE, num_stages=NUM_STAGES):
        g = k0 // GROUP_SIZE + offs_g  # [G] the tile's groups
        kr = k0 + offs_g[:, None] * GROUP_SIZE + offs_r[None, :] * 8  # [G, R] first input row of each word
        rows = kr < k_end
        ptrs = QW + (kr // 8).to(tl.int64)[:, :, None] * N + offs_n[None, None, :]
        s_ptrs = g[:, None] * N + offs_n[None, :]  # [G, BN]
        if EVEN_K:
            if EVEN_N:
                words = tl.load(ptrs)
                s = tl.load(S + s_ptrs).to(tl.float32)
            else:
                words = tl.load(ptrs, mask=n_mask[None, None, :], other=0)
                s = tl.load(S + s_ptrs, mask=n_mask[None, :], other=0.0).to(tl.float32)
        else:
            groups_in = (g * GROUP_SIZE < k_end)[:, None] & n_mask[None, :]
            words = tl.load(ptrs, mask=rows[:, :, None] & n_mask[None, None, :], other=0)
            s = tl.load(S + s_ptrs, mask=groups_in, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            if EVEN_K and EVEN_N:
                z = tl.load(Z + s_ptrs).to(tl.float32)
            elif EVEN_K:
                z = tl.load(Z + s_ptrs, mask=n_mask[None, :], other=0.0).to(tl.float32)
            else:
                z = tl.load(Z + s_ptrs, mask=groups_in, other=0.0).to(tl.float32)
        else:
            z = tl.full([GROUPS, BLOCK_N], 8.0, tl.float32)
        if PREP_SPAN == 0:
            x0, x1, x2, x3, x4, x5, x6, x7 = _x_rows(X, kr, rows, GROUPS, ROWS, not EVEN_K)
            even = (x0 + x2) + (x4 + x6)  # [G, R, 1]
            odd = (x1 + x3) + (x5 + x7)
            start = -(even * 2048.0 + odd * 128.0) - z[:, None, :] * (even + odd)
        else:
            x0, x1, x2, x3, x4, x5, x6, x7 = _x_rows(XP, kr, rows, GROUPS, ROWS, not EVEN_K)
            if PREP_SPAN == 8:
                sums = SP + (kr // 8)[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]
                if EVEN_K:
                    c, t = tl.split(tl.load(sums))  # [G, R] each
                else:
                    c, t = tl.split(tl.load(sums, mask=rows[:, :, None], other=0.0))
                start = c[:, :, None] - z[:, None, :] * t[:, :, None]
            else:
                sums = SP + g[:, None] * 2 + tl.arange(0, 2)[None, :]
                if EVEN_K:
                    c, t = tl.split(tl.load(sums))  # [G] each
                else:
                    c, t = tl.split(tl.load(sums, mask=(g * GROUP_SIZE < k_end)[:, None], other=0.0))
                gacc += s * (c[:, None] - z * t[:, None])
                start = tl.zeros([GROUPS, ROWS, BLOCK_N], dtype=tl.float32)
        acc += s[:, None, :] * _fma8_tile(start, words, x0, x1, x2, x3, x4, x5, x6, x7, FAST)
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    if PREP_SPAN == GROUP_SIZE:
        total += tl.sum(gacc, axis=0)
    return total


@triton.jit(do_not_specialize=["split_k"])
def _w4a16_gemv_column_kernel(
    X, XP, SP, QW, S, Z, Bias, Out, WS, Locks, OutXP, OutSP,
    N, K, K_PER_SPLIT, split_k,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, USE_SPLIT: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, FAST: tl.constexpr,
    PDL: tl.constexpr, PREFETCH_ROWS: tl.constexpr, PAIRED: tl.constexpr, LATE_LAUNCH: tl.constexpr,
    PREP_SPAN: tl.constexpr, PREP_OUT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n, n_mask, run_start, run_gap = column_block(pid_n, N, BLOCK_N, 1 if PAIRED else 0, 0)
    if PREFETCH_ROWS > 0:  # the weight does not depend on the kernel before: fetch it while that one runs
        prefetch_l2(QW, pid_k, K_PER_SPLIT, K, N, run_start, run_gap, PREFETCH_ROWS, BLOCK_N, 1 if PAIRED else 0)
    wait_for_previous_kernel(PDL, not LATE_LAUNCH)
    total = column_dot(X, XP, SP, QW, S, Z, N, K, K_PER_SPLIT, pid_k, offs_n, n_mask, GROUP_SIZE, HAS_ZEROS, BLOCK_N,
                       GROUPS, EVEN_N, EVEN_K, NUM_STAGES, FAST, PREP_SPAN)
    if LATE_LAUNCH:
        launch_next_kernel(PDL)
    store_row(total, Out, Bias, WS, Locks, offs_n, N, pid_n, pid_k, split_k, HAS_BIAS, USE_SPLIT, BLOCK_N, PAIRED,
              OutXP, OutSP, PREP_OUT)


def w4a16_gemv_column(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None, *,
    block_n: int = 64, groups: int = 2, split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
    silu_mul: bool = False, prep: RowPrep | None = None, prep_into: RowPrep | None = None,
) -> torch.Tensor:
    """x: [1, K] bfloat16 or float16 (permuted when weight.input_perm is set: the caller applies it)
    -> [1, N] in x's dtype. Each loop step reads `groups` whole quantization groups of `block_n`
    columns; `split_k` slices K into about that many ranges of whole steps. `silu_mul`: the weight is
    a fused [gate | up] projection (N = 2I) and the result is silu(gate) * up, [1, I], equal to
    `silu_mul_triton` of the plain product. `prep`: x's `RowPrep` (sums per packed row or per group of
    this weight), written by the kernel before; `prep_into`: buffers (`row_prep.empty_prep(I, 8)`) the
    silu_mul store fills with its output's prep per packed row, for the product after."""
    check_one_16bit_row("w4a16_gemv_column", x, weight, bias)
    if silu_mul and weight.out_features % 2:
        raise KernelInputError(f"silu_mul needs an even N = 2I ([gate | up]); the weight has N={weight.out_features}")
    if prep is not None:
        prep.check(weight.in_features)
        if prep.span not in (PACKED_ROW, weight.group_size):
            raise KernelInputError(f"row prep span {prep.span}: the product takes sums per packed row ({PACKED_ROW}) "
                                   f"or per group ({weight.group_size})")
    if prep_into is not None:
        if not silu_mul or prep_into.span != PACKED_ROW:
            raise KernelInputError("prep_into needs silu_mul and sums per packed row (span 8)")
        prep_into.check(weight.out_features // 2)
    check_choice("block_n", block_n, (16, 32, 64, 128, 256, 512), error=KernelInputError)
    check_choice("groups", groups, (1, 2, 4, 8), error=KernelInputError)
    check_choice("num_stages", num_stages, (1, 2, 3, 4, 5, 6, 7, 8), error=KernelInputError)
    if weight.group_size not in GROUP_SIZES:
        raise KernelInputError(
            f"w4a16_gemv_column takes group sizes {GROUP_SIZES}; got {weight.group_size} (use w4a16_gemv_offset)"
        )
    return launch_gemv_column(x, weight, bias, block_n, groups, split_k, num_warps, num_stages, silu_mul=silu_mul,
                              prep=prep, prep_into=prep_into)


def launch_gemv_column(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, block_n: int, groups: int, split_k: int,
    num_warps: int, num_stages: int, *, silu_mul: bool = False, prep: RowPrep | None = None,
    prep_into: RowPrep | None = None,
) -> torch.Tensor:
    """`w4a16_gemv_column` without the input checks (for callers that checked once)."""
    n, k, gs = weight.out_features, weight.in_features, weight.group_size
    step = groups * gs
    k_per_split = whole_steps_per_split(k, step, split_k, triton.cdiv(n, block_n))
    r = row_launch(x, weight, block_n, k_per_split, paired=silu_mul)
    options = launch_options(x)
    _w4a16_gemv_column_kernel[r.grid](
        x, prep.values if prep else x, prep.sums if prep else x, weight.qweight, weight.scales, r.zeros,
        bias if bias is not None else r.out, r.out, r.workspace, r.locks,
        prep_into.values if prep_into else r.out, prep_into.sums if prep_into else r.out,
        n, k, k_per_split, r.split_k,
        GROUP_SIZE=gs, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, GROUPS=groups, USE_SPLIT=r.split_k > 1,
        EVEN_N=(n // 2) % (block_n // 2) == 0 if silu_mul else n % block_n == 0, EVEN_K=k % step == 0,
        NUM_STAGES=num_stages, FAST=fast_offset(x), PAIRED=silu_mul,
        LATE_LAUNCH=LATE_LAUNCH == "all" or (silu_mul and LATE_LAUNCH == "silu_mul"),
        PREFETCH_ROWS=prefetch_rows(r.grid, block_n, k_per_split) if options["PDL"] else 0,
        PREP_SPAN=prep.span if prep else 0, PREP_OUT=prep_into is not None,
        num_warps=num_warps, num_stages=num_stages, **options,
    )
    return r.out


def prefetch_rows(grid: tuple[int, int], block_n: int, k_per_split: int) -> int:
    """Packed rows each program prefetches: `PREFETCH_BYTES` over the programs, a power of two no larger
    than a program's rows (0 when that is less than one row)."""
    per_program = PREFETCH_BYTES // (grid[0] * grid[1] * block_n * 4)
    rows = min(per_program, max(1, k_per_split // 8))
    return 0 if rows < 1 else 1 << (rows.bit_length() - 1)
