"""Triton input side of the W4A16 kernels: packed INT4 words -> scaled float tiles (imports triton).

- `nibbles_minus_zero`: a packed tile [R, N] of int32 words -> float32 [8, R, N] holding q - zero for the
  rows 8r + j at [j, r]. The int -> float conversion is the exponent trick: OR-ing a nibble into the
  mantissa of 2**23 gives exactly 2**23 + q as a float32, so one subtraction of (2**23 + zero) yields
  q - zero with no conversion instruction.
- `load_packed`: a tile of packed words; `group_scale_zero`: one group's scales and zeros (the tile lies
  in one group); `dequantize_rows`: (q - zero) * scale with each row's own group (tiles across groups,
  and the dequantization kernel).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAGIC_BITS = tl.constexpr(0x4B000000)
"""float32 bit pattern of 2**23."""
MAGIC_VALUE = tl.constexpr(8388608.0)
"""2**23."""


@triton.jit
def nibbles_minus_zero(packed, zero):
    # packed: [R, N] int32; zero: [N] float32 (or a scalar) -> [8, R, N] float32 (q - zero)
    shifts = tl.arange(0, 8) * 4
    q = (packed[None, :, :] >> shifts[:, None, None]) & 0xF
    as_float = (q | MAGIC_BITS).to(tl.float32, bitcast=True)
    return as_float - (MAGIC_VALUE + zero)


@triton.jit
def load_packed(QW, rows, offs_n, n_mask, N, num_words):
    # rows [R] packed rows (8 weight rows each), offs_n [BN] columns -> [R, BN] int32 words (0 past the ends)
    ptrs = QW + rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    return tl.load(ptrs, mask=(rows < num_words)[:, None] & n_mask[None, :], other=0)


@triton.jit
def group_scale_zero(S, Z, g, offs_n, n_mask, N, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr):
    # one group g's scales and zeros [BN] float32 (zero 8 in the symmetric layout, which stores none)
    s = tl.load(S + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(Z + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        z = tl.full([BLOCK_N], 8.0, tl.float32)
    return s, z


@triton.jit
def dequantize_rows(packed, S, Z, kk, offs_n, n_mask, N, K, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr):
    # packed [R, BN] words, kk [8, R] the weight row of each nibble -> (q - zero) * scale [8, R, BN]
    # float32, each row with its own group's scale and zero (rows past K read 0)
    gs_ptrs = (kk // GROUP_SIZE).to(tl.int64)[:, :, None] * N + offs_n[None, None, :]
    gs_mask = (kk < K)[:, :, None] & n_mask[None, None, :]
    s = tl.load(S + gs_ptrs, mask=gs_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        w = nibbles_minus_zero(packed, tl.load(Z + gs_ptrs, mask=gs_mask, other=0.0).to(tl.float32)) * s
    else:
        w = nibbles_minus_zero(packed, 8.0) * s
    return w
