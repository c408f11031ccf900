"""Triton building blocks shared by the attention kernels (imports triton: load only where it exists).

`seq_bounds` reads one sequence's rows from the varlen offsets (`terse.kernels.varlen`); `query_tile`
loads a tile of its queries with their absolute positions and fresh online-softmax state; `load_kv_rows`
gathers key/value rows of one kv head.
`attend_tile` is one step of the online softmax (scores kept in log2 units): it folds one key tile into
the running row maximum `m_i`, row sum `l_i` and output accumulator `acc`. Rows whose every score so far
is -inf keep m_i = -inf, l_i = 0 and acc = 0, so a row that sees no key ends as zeros instead of NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def seq_bounds(CuSeqlensQ, CuSeqlensK, b):
    # 64-bit starts: row offsets reach 1M tokens x 32 heads x 128 channels > 2**31
    q_start = tl.load(CuSeqlensQ + b).to(tl.int64)
    q_len = (tl.load(CuSeqlensQ + b + 1) - q_start).to(tl.int32)
    k_start = tl.load(CuSeqlensK + b).to(tl.int64)
    k_len = (tl.load(CuSeqlensK + b + 1) - k_start).to(tl.int32)
    return q_start, q_len, k_start, k_len


@triton.jit
def query_tile(Q, q_start, q_len, k_len, h_q, pid_m, stride_qt, stride_qh,
               BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    # -> q [BLOCK_M, D] (rows past q_len are 0), q_pos [BLOCK_M] absolute positions, offs_m, offs_d,
    #    and the online-softmax state acc [BLOCK_M, D], m_i, l_i [BLOCK_M] of a row that has seen nothing
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + h_q * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m < q_len)[:, None], other=0.0)
    q_pos = k_len - q_len + offs_m  # queries are the last q_len of k_len positions
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return q, q_pos, offs_m, offs_d, acc, m_i, l_i


@triton.jit
def load_kv_rows(K_head, V_head, rows, valid, stride_kt, stride_vt, offs_d):
    # rows [N] key positions of one sequence and kv head, valid [N] bool -> k, v [N, D] (invalid rows 0)
    rows64 = rows.to(tl.int64)[:, None]
    k = tl.load(K_head + rows64 * stride_kt + offs_d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(V_head + rows64 * stride_vt + offs_d[None, :], mask=valid[:, None], other=0.0)
    return k, v


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
