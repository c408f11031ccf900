"""Triton input side of the W4A16 kernels: packed INT4 words -> scaled float tiles (imports triton).

- `nibbles_minus_zero`: a packed tile [R, N] of int32 words -> float32 [8, R, N] holding q - zero for the
  rows 8r + j at [j, r]. The int -> float conversion is the exponent trick: OR-ing a nibble into the
  mantissa of 2**23 gives exactly 2**23 + q as a float32, so one subtraction of (2**23 + zero) yields
  q - zero with no conversion instruction.
- `load_packed`: a tile of packed words; `group_scale_zero`: one group's scales and zeros (the tile lies
  in one group); `dequantize_rows`: (q - zero) * scale with each row's own group (tiles across groups,
  and the dequantization kernel); `word_scale_zero`: each word's group scale and zero.
- `unpack_words`: words [A, B] -> [A, B, 8] in the activation dtype, (q - zero) (* scale), the 8 rows of
  a word in `word_order` (0, 4, 1, 5, 2, 6, 3, 7); for bfloat16 / float16 on the GPU through 16-bit PTX
  (below), else plain Triton with the same values and order. `in_word_order` permutes x's columns to match.
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


# -- 16-bit unpacking: one packed word -> 8 weights in the activation dtype --------------------------
# The same exponent trick at 16 bits: OR-ing nibbles into the mantissas of a pair of 16-bit floats
# (0x4300 is bfloat16 128.0, 0x6400 float16 1024.0; the unit in the last place is 1 at both) gives
# exactly (magic + q) in each half, so one packed fused multiply-add per two weights subtracts
# (magic + zero) and a second one scales. Per word: 3 shifts, 4 LOP3, 8 packed FMAs for 8 weights,
# instead of a shift, a mask, an OR, a subtraction and a multiply per weight in float32. The halves of
# t_i hold nibbles i and i + 4.
_UNPACK_HEAD = """{
.reg .b32 s1, s2, s3, t0, t1, t2, t3, one, nz;
shr.u32 s1, $8, 4;
shr.u32 s2, $8, 8;
shr.u32 s3, $8, 12;
lop3.b32 t0, $8, 0x000f000f, MAGIC, 0xea;
lop3.b32 t1, s1, 0x000f000f, MAGIC, 0xea;
lop3.b32 t2, s2, 0x000f000f, MAGIC, 0xea;
lop3.b32 t3, s3, 0x000f000f, MAGIC, 0xea;
mov.b32 one, ONE;
mov.b32 nz, 0x80008000;
fma.rn.TYPE t0, t0, one, $9;
fma.rn.TYPE t1, t1, one, $9;
fma.rn.TYPE t2, t2, one, $9;
fma.rn.TYPE t3, t3, one, $9;
"""
_UNPACK_SCALE = """fma.rn.TYPE t0, t0, $10, nz;
fma.rn.TYPE t1, t1, $10, nz;
fma.rn.TYPE t2, t2, $10, nz;
fma.rn.TYPE t3, t3, $10, nz;
"""
_UNPACK_TAIL = """mov.b32 {$0, $4}, t0;
mov.b32 {$1, $5}, t1;
mov.b32 {$2, $6}, t2;
mov.b32 {$3, $7}, t3;
}"""


def _unpack_asm(type_name: str, magic: str, one: str, scale: bool) -> str:
    body = _UNPACK_HEAD + (_UNPACK_SCALE if scale else "") + _UNPACK_TAIL
    return body.replace("MAGIC", magic).replace("ONE", one).replace("TYPE", type_name)


ASM_BF16 = tl.constexpr(_unpack_asm("bf16x2", "0x43004300", "0x3f803f80", scale=False))
ASM_BF16_SCALED = tl.constexpr(_unpack_asm("bf16x2", "0x43004300", "0x3f803f80", scale=True))
ASM_F16 = tl.constexpr(_unpack_asm("f16x2", "0x64006400", "0x3c003c00", scale=False))
ASM_F16_SCALED = tl.constexpr(_unpack_asm("f16x2", "0x64006400", "0x3c003c00", scale=True))
UNPACK_CONSTRAINTS = tl.constexpr("=h,=h,=h,=h,=h,=h,=h,=h,r,r,r")


@triton.jit
def word_order(i):
    # tile row i of a K tile unpacked by `unpack_words` -> its row offset inside the tile: words stay
    # in order, the 8 nibbles of a word come as 0, 4, 1, 5, 2, 6, 3, 7 (the dot product sums over K in
    # any order, so x is loaded in the same order instead of reshuffling the weights)
    p = i % 8
    return i - p + (p % 2) * 4 + p // 2


@triton.jit
def in_word_order(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    # [ROWS, COLS] with columns in input order -> columns in `word_order` within every 8: position
    # 2a + b holds column 4b + a
    return tl.reshape(tl.permute(tl.reshape(x, [ROWS, COLS // 8, 2, 4]), (0, 1, 3, 2)), [ROWS, COLS])


@triton.jit
def _pair(v):
    # [A, B] 16-bit floats -> int32 [A, B] holding v in both halves (operands of the packed FMAs)
    bits = v.to(tl.uint16, bitcast=True).to(tl.uint32)
    return (bits | (bits << 16)).to(tl.int32, bitcast=True)


@triton.jit
def _join_word_order(o0, o1, o2, o3, o4, o5, o6, o7):
    # eight [A, B] tensors, o_j holding nibble j -> [A, B, 8] in `word_order` (0, 4, 1, 5, 2, 6, 3, 7).
    # join's new axis is the fastest: join(P, Q) puts P at the even and Q at the odd positions, so
    # nibbles j and j + 4 (the two halves of one register of the PTX path) end up side by side.
    p = tl.join(tl.join(o0, o2), tl.join(o1, o3))  # positions 0, 2, 4, 6
    q = tl.join(tl.join(o4, o6), tl.join(o5, o7))  # positions 1, 3, 5, 7
    return tl.reshape(tl.join(p, q), [o0.shape[0], o0.shape[1], 8])


@triton.jit
def _run_unpack(asm: tl.constexpr, packed, nz, ss, BF16: tl.constexpr):
    if BF16:
        o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
            asm, UNPACK_CONSTRAINTS, [packed, nz, ss], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
            asm, UNPACK_CONSTRAINTS, [packed, nz, ss], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    return _join_word_order(o0, o1, o2, o3, o4, o5, o6, o7)


@triton.jit
def unpack_words(packed, s, z, DTYPE: tl.constexpr, SCALE: tl.constexpr, FAST: tl.constexpr):
    # packed: [A, B] int32; s, z: [A, B] float32 (or broadcastable) -> [A, B, 8] DTYPE holding
    # (q - z) * s (SCALE) or q - z for the 8 weights of each word in `word_order`: [..., p] holds
    # nibble (p % 2) * 4 + p // 2 (0, 4, 1, 5, 2, 6, 3, 7), the order the 16-bit path leaves them in
    # registers. FAST: that path (bfloat16/float16 on the GPU), else plain Triton (float32, the
    # interpreter).
    if FAST:
        magic = 128.0 if tl.bfloat16 == DTYPE else 1024.0
        nz = _pair((-(z + magic)).to(DTYPE))  # exact: small integers
        ss = _pair(s.to(DTYPE))
        zero = tl.zeros(packed.shape, tl.int32)
        if tl.bfloat16 == DTYPE:
            if SCALE:
                w = _run_unpack(ASM_BF16_SCALED, packed, nz + zero, ss + zero, tl.bfloat16 == DTYPE)
            else:
                w = _run_unpack(ASM_BF16, packed, nz + zero, ss + zero, tl.bfloat16 == DTYPE)
        else:
            if SCALE:
                w = _run_unpack(ASM_F16_SCALED, packed, nz + zero, ss + zero, tl.bfloat16 == DTYPE)
            else:
                w = _run_unpack(ASM_F16, packed, nz + zero, ss + zero, tl.bfloat16 == DTYPE)
        return w
    else:  # the same values and order through plain Triton (the interpreter tests the joins above)
        return _join_word_order(
            _nibble(packed, 0, s, z, DTYPE, SCALE), _nibble(packed, 1, s, z, DTYPE, SCALE),
            _nibble(packed, 2, s, z, DTYPE, SCALE), _nibble(packed, 3, s, z, DTYPE, SCALE),
            _nibble(packed, 4, s, z, DTYPE, SCALE), _nibble(packed, 5, s, z, DTYPE, SCALE),
            _nibble(packed, 6, s, z, DTYPE, SCALE), _nibble(packed, 7, s, z, DTYPE, SCALE),
        )


@triton.jit
def _nibble(packed, j: tl.constexpr, s, z, DTYPE: tl.constexpr, SCALE: tl.constexpr):
    # nibble j of every word: (q - z) (* s) in float32 (exact: small integers, one rounding for the
    # scale, as the reference), then DTYPE
    q = ((packed >> (4 * j)) & 0xF) | MAGIC_BITS
    w = q.to(tl.float32, bitcast=True) - (MAGIC_VALUE + z)
    if SCALE:
        w = w * s
    return w.to(DTYPE)


@triton.jit
def word_scale_zero(S, Z, rows, offs_n, n_mask, N, K, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr):
    # packed rows [R] (each inside one group: GROUP_SIZE is a multiple of 8), columns [BN] -> the scale
    # and zero of every word, [R, BN] float32 (zero 8 in the symmetric layout; 0 past the ends)
    ptrs = (rows * 8 // GROUP_SIZE).to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = (rows * 8 < K)[:, None] & n_mask[None, :]
    s = tl.load(S + ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(Z + ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        z = tl.full(s.shape, 8.0, tl.float32)
    return s, z
