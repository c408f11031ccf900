"""Triton paged-decode attention: one query per sequence over its KV blocks, split along the context.

Work split (flash-decoding): program (b, h, s) handles sequence b, KV head h (and the GROUP query heads
sharing it) and the s-th of NUM_SPLITS contiguous ranges of that sequence's pages (ranges follow each
sequence's own length, so a short context in a long padded table still uses every split). Each program
writes a partial (max, sum, weighted values); a second small kernel merges the splits:

    out = sum_s exp(m_s - m) * acc_s / sum_s exp(m_s - m) * l_s,   m = max_s m_s

Grid and buffer shapes depend only on (B, max_blocks), so the launch can be captured in a CUDA graph;
a program whose range lies past the context length does nothing but write an empty partial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    q_ptr, kv_ptr, tables_ptr, lens_ptr, acc_ptr, m_ptr, l_ptr,
    stride_qb, stride_qh,
    stride_kv, stride_kvblk, stride_kvtok, stride_kvh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(lens_ptr + b)
    num_pages = (ctx_len + BLOCK_SIZE - 1) // BLOCK_SIZE
    pages_per_split = (num_pages + NUM_SPLITS - 1) // NUM_SPLITS  # split this sequence's own pages
    page_lo = split * pages_per_split
    page_hi = tl.minimum(page_lo + pages_per_split, num_pages)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, BLOCK_SIZE)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    # q: [GROUP_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for page in range(page_lo, page_hi):
        block_id = tl.load(tables_ptr + b * stride_tb + page).to(tl.int64)
        base = block_id * stride_kvblk + kvh * stride_kvh
        tok_off = offs_t[:, None] * stride_kvtok + offs_d[None, :]
        k = tl.load(kv_ptr + base + tok_off)  # [BLOCK_SIZE, D]
        v = tl.load(kv_ptr + stride_kv + base + tok_off)
        if IEEE:  # float32 pools: full-precision dots (the default would round operands to tf32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GROUP_PAD, BLOCK_SIZE]
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        valid = (page * BLOCK_SIZE + offs_t) < ctx_len
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_off = b * stride_ab + heads * stride_ah + split * stride_as
    tl.store(m_ptr + out_off, m_i, mask=g_mask)
    tl.store(l_ptr + out_off, l_i, mask=g_mask)
    tl.store(acc_ptr + out_off[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _merge_splits_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    acc_ptr, m_ptr, l_ptr, out_ptr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    row = tl.program_id(0)  # one (sequence, head)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    m = tl.load(m_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    l_sum = tl.load(l_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    acc = tl.load(acc_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None], other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # empty splits: exp(-inf) = 0
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


def paged_decode_triton(
    q: torch.Tensor, layer_kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    num_splits: int = 16,
) -> torch.Tensor:
    """q: [B, H, D]; layer_kv: [2, NB, bs, KVH, D] (contiguous); block_tables: [B, max_blocks] int;
    context_lens: [B] int32 (>= 1). Returns [B, H, D] in q's dtype."""
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, kv_dim = layer_kv.shape
    assert kv_dim == head_dim and num_heads % num_kv_heads == 0, "head shapes of q and the KV pool differ"
    assert q.stride(-1) == 1 and layer_kv.is_contiguous(), "q rows and the KV pool must be contiguous"
    assert block_size >= 16 and head_dim >= 16, "the kernel needs block_size and head_dim >= 16"
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    splits = max(1, min(num_splits, max_blocks))
    # partials: [B, H, S] for m and l, [B, H, S, D] for acc (float32)
    m = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    grid = (num_seqs, num_kv_heads, splits)
    _paged_decode_kernel[grid](
        q, layer_kv, block_tables, context_lens, acc, m, l_sum,
        q.stride(0), q.stride(1),
        layer_kv.stride(0), layer_kv.stride(1), layer_kv.stride(2), layer_kv.stride(3),
        block_tables.stride(0),
        m.stride(0), m.stride(1), m.stride(2),
        head_dim**-0.5,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, NUM_SPLITS=splits, IEEE=q.dtype == torch.float32,
    )
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    _merge_splits_kernel[(num_seqs * num_heads,)](
        acc, m, l_sum, out, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim
    )
    return out
