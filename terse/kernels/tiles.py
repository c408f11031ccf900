"""Triton building blocks shared by the attention kernels (imports triton: load only where it exists).

`attend_tile` is one step of the online softmax (scores kept in log2 units): it folds one key tile into
the running row maximum `m_i`, row sum `l_i` and output accumulator `acc`. Rows whose every score so far
is -inf keep m_i = -inf, l_i = 0 and acc = 0, so a row that sees no key ends as zeros instead of NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, IS_FP32: tl.constexpr):
    # q: [BLOCK_M, D], k/v: [BLOCK_N, D], visible: [BLOCK_M, BLOCK_N] bool
    if IS_FP32:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = tl.where(visible, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row with nothing visible yet keeps m_new = -inf; subtract 0 there so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IS_FP32:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def store_rows(Out, acc, l_i, out_start, offs_m, q_len, h_q, stride_ot, stride_oh, offs_d):
    # Out rows of one query tile; rows that saw nothing have l_i = 0 and acc = 0 -> write zeros
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    ptrs = Out + (out_start + offs_m)[:, None] * stride_ot + h_q * stride_oh + offs_d[None, :]
    tl.store(ptrs, o.to(Out.dtype.element_ty), mask=(offs_m < q_len)[:, None])
