"""Triton helpers that write a `RowPrep` (terse.kernels.row_prep) from a row a kernel holds in registers."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def packed_row_sums(v, ROWS: tl.constexpr):
    # v [ROWS * 8] float32 -> (c, t) [ROWS] each, added in the column GEMV's order:
    # even = (x0 + x2) + (x4 + x6), odd = (x1 + x3) + (x5 + x7)
    ev, od = tl.split(tl.reshape(v, [ROWS, 4, 2]))  # [ROWS, 4]: x0 x2 x4 x6 | x1 x3 x5 x7
    e04, e26 = tl.split(tl.reshape(ev, [ROWS, 2, 2]))  # x0 x4 | x2 x6
    o15, o37 = tl.split(tl.reshape(od, [ROWS, 2, 2]))
    ea, eb = tl.split(e04 + e26)  # x0 + x2 | x4 + x6
    oa, ob = tl.split(o15 + o37)
    even = ea + eb
    odd = oa + ob
    return -(even * 2048.0 + odd * 128.0), even + odd


@triton.jit
def span_sums(v, SPANS: tl.constexpr, SPAN: tl.constexpr):
    # v [SPANS * SPAN] float32 -> (c, t) [SPANS] each, per span of SPAN inputs
    if SPAN == 8:
        c, t = packed_row_sums(v, SPANS)
    else:
        ev, od = tl.split(tl.reshape(v, [SPANS, SPAN // 2, 2]))
        even = tl.sum(ev, axis=1)
        odd = tl.sum(od, axis=1)
        c = -(even * 2048.0 + odd * 128.0)
        t = even + odd
    return c, t


@triton.jit
def store_prep(v, offs, K, XP, SP, SPANS: tl.constexpr, SPAN: tl.constexpr):
    # v [SPANS * SPAN] float32: x at offs (consecutive, the first a multiple of SPAN; 0 where offs >= K)
    tl.store(XP + offs, v, mask=offs < K)
    c, t = span_sums(v, SPANS, SPAN)
    span = tl.min(tl.reshape(offs, [SPANS, SPAN]), axis=1) // SPAN
    valid = span * SPAN < K
    tl.store(SP + span * 2, c, mask=valid)
    tl.store(SP + span * 2 + 1, t, mask=valid)
