"""Causal varlen attention over sinks + a local window per head (A-shape), Triton.

Query at absolute position p sees key j iff j <= p and (j < num_sink_tokens[h] or p - j < window_len[h]).
A query tile walks the key blocks that hold sink tokens, then the blocks from its earliest window key
to its diagonal (skipping blocks already walked as sinks), masking token-exactly:

    keys ->  [sink blocks]  . . . . . . .  [window blocks .. diagonal]
                            never loaded

window_len >= k_len makes it dense causal attention (the engine's dense fallback for single heads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.block_sparse import LOG2_E, kernel_config
from terse.kernels.checks import (
    check_block_size,
    check_triton_batch,
    num_blocks,
    output_for,
    resolve_head_ids,
)
from terse.kernels.tiles import attend_tile, load_kv_rows, query_tile, seq_bounds, store_rows
from terse.kernels.varlen import VarlenBatch


@triton.jit
def _attend_blocks(acc, m_i, l_i, q, q_pos, K_head, V_head, first_block, end_block, k_len, num_sink, window,
                   qk_scale, stride_kt, stride_vt, offs_d, BLOCK_N: tl.constexpr, IS_FP32: tl.constexpr):
    # key blocks first_block .. end_block - 1, masked token-exactly to sinks + window, causal
    offs_n = tl.arange(0, BLOCK_N)
    for kb in range(first_block, end_block):
        offs_k = kb * BLOCK_N + offs_n
        k, v = load_kv_rows(K_head, V_head, offs_k, offs_k < k_len, stride_kt, stride_vt, offs_d)
        rel = q_pos[:, None] - offs_k[None, :]
        visible = (rel >= 0) & ((offs_k[None, :] < num_sink) | (rel < window))
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, IS_FP32)
    return acc, m_i, l_i


@triton.jit
def _a_shape_fwd(
    Q, K, V, Out, CuSeqlensQ, CuSeqlensK, HeadIds, NumSinkTokens, WindowLen,
    qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = seq_bounds(CuSeqlensQ, CuSeqlensK, b)
    if pid_m * BLOCK_M >= q_len:
        return
    h_q = tl.load(HeadIds + h)
    q, q_pos, offs_m, offs_d, acc, m_i, l_i = query_tile(
        Q, q_start, q_len, k_len, h_q, pid_m, stride_qt, stride_qh, BLOCK_M, HEAD_DIM
    )
    h_kv = h_q // GROUP
    K_head = K + k_start * stride_kt + h_kv * stride_kh
    V_head = V + k_start * stride_vt + h_kv * stride_vh
    num_sink = tl.load(NumSinkTokens + h)
    window = tl.load(WindowLen + h)

    first_q = k_len - q_len + pid_m * BLOCK_M
    last_q = tl.minimum(first_q + BLOCK_M, k_len) - 1
    end_block = last_q // BLOCK_N + 1  # one past the diagonal block
    sink_end = tl.minimum((tl.minimum(num_sink, k_len) + BLOCK_N - 1) // BLOCK_N, end_block)
    window_start = tl.maximum(first_q - window + 1, 0) // BLOCK_N
    window_start = tl.maximum(window_start, sink_end)
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, q_pos, K_head, V_head, 0, sink_end, k_len, num_sink, window, qk_scale,
        stride_kt, stride_vt, offs_d, BLOCK_N, IS_FP32,
    )
    acc, m_i, l_i = _attend_blocks(
        acc, m_i, l_i, q, q_pos, K_head, V_head, window_start, end_block, k_len, num_sink, window, qk_scale,
        stride_kt, stride_vt, offs_d, BLOCK_N, IS_FP32,
    )
    store_rows(Out, acc, l_i, q_start, offs_m, q_len, h_q, stride_ot, stride_oh, offs_d)


def a_shape_attention(
    batch: VarlenBatch,
    num_sink_tokens: torch.Tensor,
    window_len: torch.Tensor,
    scale: float,
    *,
    block_size_q: int = 64,
    block_size_k: int = 64,
    head_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sinks + local window attention -> out [total_q, Hq, D] in q's dtype.

    num_sink_tokens, window_len: int32 [H] per head of `head_ids` (all Hq heads when None); window_len
    must be >= 1 so every query sees at least itself. Writes into `out` in place when given.
    """
    check_triton_batch(batch)
    check_block_size("block_size_q", block_size_q)
    check_block_size("block_size_k", block_size_k)
    q, k, v, layout = batch.q, batch.k, batch.v, batch.layout
    heads = resolve_head_ids(head_ids, batch.num_q_heads, q.device)
    for name, t in (("num_sink_tokens", num_sink_tokens), ("window_len", window_len)):
        if t.dtype != torch.int32 or t.shape != heads.shape or t.device != q.device:
            raise KernelInputError(
                f"{name} is {t.dtype} of shape {tuple(t.shape)} on {t.device}; expected int32 "
                f"{tuple(heads.shape)} (one per head) on {q.device}"
            )
    if q.device.type == "cpu" and (int(window_len.min()) < 1 or int(num_sink_tokens.min()) < 0):
        raise KernelInputError("window_len must be >= 1 and num_sink_tokens >= 0 for every head")
    out = output_for(batch, out, head_ids)
    grid = (num_blocks(layout.max_seqlen_q, block_size_q), heads.numel(), batch.num_seqs)
    _a_shape_fwd[grid](
        q, k, v, out, layout.cu_seqlens_q, layout.cu_seqlens_k, heads, num_sink_tokens, window_len,
        scale * LOG2_E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=batch.group_size, HEAD_DIM=batch.head_dim, BLOCK_M=block_size_q, BLOCK_N=block_size_k,
        IS_FP32=q.dtype == torch.float32,
        **kernel_config(batch.head_dim, block_size_q),
    )
    return out
