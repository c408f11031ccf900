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
from terse.kernels.block_sparse import LOG2_E, kernel_config, resolve_head_ids
from terse.kernels.checks import check_block_size, check_device_for_triton, check_varlen_inputs, num_blocks
from terse.kernels.tiles import attend_tile, store_rows


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
    q_start = tl.load(CuSeqlensQ + b).to(tl.int64)  # 64-bit offsets: 1M tokens x 32 heads x 128 > 2**31
    q_len = (tl.load(CuSeqlensQ + b + 1) - q_start).to(tl.int32)
    if pid_m * BLOCK_M >= q_len:
        return
    k_start = tl.load(CuSeqlensK + b).to(tl.int64)
    k_len = (tl.load(CuSeqlensK + b + 1) - k_start).to(tl.int32)
    h_q = tl.load(HeadIds + h)
    h_kv = h_q // GROUP
    num_sink = tl.load(NumSinkTokens + h)
    window = tl.load(WindowLen + h)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_pos = k_len - q_len + offs_m
    q_ptrs = Q + (q_start + offs_m)[:, None] * stride_qt + h_q * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m < q_len)[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    K_head = K + k_start * stride_kt + h_kv * stride_kh
    V_head = V + k_start * stride_vt + h_kv * stride_vh

    first_q = k_len - q_len + pid_m * BLOCK_M
    last_q = tl.minimum(first_q + BLOCK_M, k_len) - 1
    end_block = last_q // BLOCK_N + 1  # one past the diagonal block
    sink_end = tl.minimum((tl.minimum(num_sink, k_len) + BLOCK_N - 1) // BLOCK_N, end_block)
    window_start = tl.maximum(first_q - window + 1, 0) // BLOCK_N
    window_start = tl.maximum(window_start, sink_end)
    for kb in range(0, sink_end):
        offs_k = kb * BLOCK_N + offs_n
        in_seq = (offs_k < k_len)[:, None]
        k = tl.load(K_head + offs_k.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], mask=in_seq, other=0.0)
        v = tl.load(V_head + offs_k.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], mask=in_seq, other=0.0)
        rel = q_pos[:, None] - offs_k[None, :]
        visible = (rel >= 0) & ((offs_k[None, :] < num_sink) | (rel < window))
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, IS_FP32)
    for kb in range(window_start, end_block):
        offs_k = kb * BLOCK_N + offs_n
        in_seq = (offs_k < k_len)[:, None]
        k = tl.load(K_head + offs_k.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], mask=in_seq, other=0.0)
        v = tl.load(V_head + offs_k.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], mask=in_seq, other=0.0)
        rel = q_pos[:, None] - offs_k[None, :]
        visible = (rel >= 0) & ((offs_k[None, :] < num_sink) | (rel < window))
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, IS_FP32)

    store_rows(Out, acc, l_i, q_start, offs_m, q_len, h_q, stride_ot, stride_oh, offs_d)


def a_shape_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
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
    shape = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_device_for_triton(q)
    check_block_size("block_size_q", block_size_q)
    check_block_size("block_size_k", block_size_k)
    heads = resolve_head_ids(head_ids, shape.num_q_heads, q.device)
    for name, t in (("num_sink_tokens", num_sink_tokens), ("window_len", window_len)):
        if t.dtype != torch.int32 or t.shape != heads.shape or t.device != q.device:
            raise KernelInputError(
                f"{name} is {t.dtype} of shape {tuple(t.shape)} on {t.device}; expected int32 "
                f"{tuple(heads.shape)} (one per head) on {q.device}"
            )
    if q.device.type == "cpu" and (int(window_len.min()) < 1 or int(num_sink_tokens.min()) < 0):
        raise KernelInputError("window_len must be >= 1 and num_sink_tokens >= 0 for every head")
    if out is None:
        out = torch.zeros_like(q) if head_ids is not None else torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise KernelInputError(f"out must match q ({tuple(q.shape)}, {q.dtype}, unit last stride)")
    grid = (num_blocks(max_seqlen_q, block_size_q), heads.numel(), shape.num_seqs)
    _a_shape_fwd[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k, heads, num_sink_tokens, window_len,
        scale * LOG2_E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=shape.group_size, HEAD_DIM=shape.head_dim, BLOCK_M=block_size_q, BLOCK_N=block_size_k,
        IS_FP32=q.dtype == torch.float32,
        **kernel_config(shape.head_dim, block_size_q),
    )
    return out
