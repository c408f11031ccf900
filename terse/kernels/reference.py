"""Float32 dense attention under the exact mask each sparse index format describes.

Every Triton kernel in this package has a reference here with the same signature (a `VarlenBatch`, the
index, the scale); tests compare them.
The masks are built independently of the kernels' index conversion, straight from each format's
definition (causal always, query i of a sequence at absolute position k_len - q_len + i):

block-sparse    block_idx [B, H, num_q_blocks, max_blocks] int32, block_count [B, H, num_q_blocks] int32.
                Query block m holds local queries m*block_size_q .. (m+1)*block_size_q - 1; it attends to
                key blocks block_idx[b, h, m, :count] (block n = keys n*block_size_k .. (n+1)*block_size_k - 1).
                Entries past the count are ignored, as are blocks past the keys; listed blocks must be
                distinct and >= 0.
                Optional columns col_idx [B, H, num_q_blocks, max_cols] / col_count: single key positions the
                block attends to as well (positions outside 0 .. k_len - 1 are ignored); they must not
                fall inside one of the row's listed blocks.
vertical-slash  vertical_idx [B, H, num_vertical] int32 key positions, slash_idx [B, H, num_slash] int32
                diagonal offsets d (query at absolute position p sees key p - d); -1 pads, values >= k_len
                are ignored. A chosen column is attended by every query at or after it. A chosen diagonal
                is taken at block granularity: in each query block it selects every key block it passes
                through (the whole block is computed), which is what the kernel computes:

                    keys ->     block 0    block 1    block 2     diagonal d = 3, block_size 4:
                    q blk 1     . d d d    d . . .    . . . .     queries 4..7 hit keys 1..4 (d),
                    (abs 4-7)   # # # #    # # # #    . . . .     so blocks 0 and 1 are computed (#),
                                                                  causal mask applied inside them
a-shape         num_sink_tokens [H], window_len [H] int32: query at position p sees key j iff j <= p and
                (j < num_sink_tokens or p - j < window_len). window_len >= k_len is dense causal attention.

Rows that see no key (possible with a block-sparse index that omits the diagonal) output zeros.
`head_ids` (optional, int32 [H]) names the query heads the index rows belong to; other heads are left 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from terse.kernels.checks import num_blocks
from terse.kernels.varlen import VarlenBatch


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, k_len] bool: query i (absolute k_len - q_len + i) sees keys 0 .. k_len - q_len + i."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]


def _expand_blocks(
    selected: torch.Tensor, q_len: int, k_len: int, block_size_q: int, block_size_k: int
) -> torch.Tensor:
    # selected: [H, num_q_blocks, num_k_blocks] -> [H, q_len, k_len]
    q_block = torch.arange(q_len, device=selected.device) // block_size_q
    k_block = torch.arange(k_len, device=selected.device) // block_size_k
    return selected[:, q_block][:, :, k_block]


def block_sparse_mask(
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    q_len: int,
    k_len: int,
    block_size_q: int,
    block_size_k: int,
    col_idx: torch.Tensor | None = None,
    col_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask of one sequence's block-sparse index (+ optional columns). Inputs are that sequence's rows:
    block_idx [H, >= num_q_blocks, max_blocks], block_count [H, >= num_q_blocks]. -> [H, q_len, k_len] bool."""
    num_q_blocks, num_k_blocks = num_blocks(q_len, block_size_q), num_blocks(k_len, block_size_k)
    num_heads = block_idx.shape[0]
    idx = block_idx[:, :num_q_blocks].long()
    valid = torch.arange(idx.shape[-1], device=idx.device) < block_count[:, :num_q_blocks, None]
    valid &= (idx >= 0) & (idx < num_k_blocks)
    selected = torch.zeros(num_heads, num_q_blocks, num_k_blocks + 1, dtype=torch.bool, device=idx.device)
    selected.scatter_(2, torch.where(valid, idx, num_k_blocks), True)
    mask = _expand_blocks(selected[..., :num_k_blocks], q_len, k_len, block_size_q, block_size_k)
    if col_idx is not None and col_count is not None:
        cols = col_idx[:, :num_q_blocks].long()
        cvalid = torch.arange(cols.shape[-1], device=cols.device) < col_count[:, :num_q_blocks, None]
        cvalid &= (cols >= 0) & (cols < k_len)
        col_sel = torch.zeros(num_heads, num_q_blocks, k_len + 1, dtype=torch.bool, device=cols.device)
        col_sel.scatter_(2, torch.where(cvalid, cols, k_len), True)
        q_block = torch.arange(q_len, device=cols.device) // block_size_q
        mask |= col_sel[:, q_block, :k_len]
    return mask & causal_mask(q_len, k_len, block_idx.device)


def vertical_slash_mask(
    vertical_idx: torch.Tensor,
    slash_idx: torch.Tensor,
    q_len: int,
    k_len: int,
    block_size_q: int,
    block_size_k: int,
) -> torch.Tensor:
    """Mask of one sequence's vertical-slash index: vertical_idx [H, NV], slash_idx [H, NS] -> [H, q_len, k_len]."""
    device = vertical_idx.device
    num_q_blocks, num_k_blocks = num_blocks(q_len, block_size_q), num_blocks(k_len, block_size_k)
    offset = k_len - q_len
    m = torch.arange(num_q_blocks, device=device)
    first_q = offset + m * block_size_q  # [NQB] absolute position of the block's first query
    last_q = offset + torch.clamp((m + 1) * block_size_q, max=q_len) - 1  # [NQB]
    d = slash_idx.long()[:, None, None, :]  # [H, 1, 1, NS]
    lo = torch.clamp(first_q[None, :, None, None] - d, min=0)  # [H, NQB, 1, NS]
    hi = last_q[None, :, None, None] - d
    n = torch.arange(num_k_blocks, device=device)[None, None, :, None]  # [1, 1, NKB, 1]
    hits = (d >= 0) & (d < k_len) & (hi >= 0) & (n * block_size_k <= hi) & ((n + 1) * block_size_k - 1 >= lo)
    mask = _expand_blocks(hits.any(-1), q_len, k_len, block_size_q, block_size_k)
    cols = vertical_idx.long()
    cvalid = (cols >= 0) & (cols < k_len)
    col_sel = torch.zeros(vertical_idx.shape[0], k_len + 1, dtype=torch.bool, device=device)
    col_sel.scatter_(1, torch.where(cvalid, cols, k_len), True)
    mask |= col_sel[:, None, :k_len]
    return mask & causal_mask(q_len, k_len, device)


def a_shape_mask(
    num_sink_tokens: torch.Tensor, window_len: torch.Tensor, q_len: int, k_len: int
) -> torch.Tensor:
    """Mask of sinks + local window per head: num_sink_tokens [H], window_len [H] -> [H, q_len, k_len]."""
    device = num_sink_tokens.device
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[None, :, None]
    k_pos = torch.arange(k_len, device=device)[None, None, :]
    sink = k_pos < num_sink_tokens.long()[:, None, None]
    local = (q_pos - k_pos) < window_len.long()[:, None, None]
    return (sink | local) & (k_pos <= q_pos)


def masked_attention(
    batch: VarlenBatch,
    masks: Sequence[torch.Tensor],
    scale: float,
    head_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense float32 attention, one mask [H, q_len, k_len] per sequence over the heads `head_ids`.

    Returns out [total_q, Hq, D] float32; heads outside head_ids and rows with no visible key are 0.
    """
    q, k, v, layout = batch.q, batch.k, batch.v, batch.layout
    heads = torch.arange(batch.num_q_heads) if head_ids is None else head_ids.cpu().long()
    kv_heads = (heads // batch.group_size).to(q.device)
    heads = heads.to(q.device)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, mask in enumerate(masks):
        q_rows, k_rows = layout.q_rows(b), layout.k_rows(b)
        if q_rows.stop == q_rows.start:
            continue
        q_b = q[q_rows, heads].float().transpose(0, 1)  # [H, q_len, D]
        k_b = k[k_rows, kv_heads].float().transpose(0, 1)  # [H, k_len, D]
        v_b = v[k_rows, kv_heads].float().transpose(0, 1)
        scores = torch.matmul(q_b, k_b.transpose(1, 2)) * scale  # [H, q_len, k_len]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        out[q_rows, heads] = torch.matmul(probs, v_b).transpose(0, 1)
    return out


def reference_block_sparse_attention(
    batch: VarlenBatch,
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    scale: float,
    *,
    col_idx: torch.Tensor | None = None,
    col_count: torch.Tensor | None = None,
    block_size_q: int = 64,
    block_size_k: int = 64,
    head_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of `block_sparse_attention` (same arguments) -> out [total_q, Hq, D] float32."""
    masks = []
    for b, (q_len, k_len) in enumerate(batch.layout.lengths):
        cols = (col_idx[b], col_count[b]) if col_idx is not None and col_count is not None else (None, None)
        masks.append(
            block_sparse_mask(
                block_idx[b], block_count[b], q_len, k_len, block_size_q, block_size_k, cols[0], cols[1]
            )
        )
    return masked_attention(batch, masks, scale, head_ids)


def reference_vertical_slash_attention(
    batch: VarlenBatch,
    vertical_idx: torch.Tensor,
    slash_idx: torch.Tensor,
    scale: float,
    *,
    block_size_q: int = 64,
    block_size_k: int = 64,
    head_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of `vertical_slash_attention` (same arguments) -> out [total_q, Hq, D] float32."""
    masks = [
        vertical_slash_mask(vertical_idx[b], slash_idx[b], q_len, k_len, block_size_q, block_size_k)
        for b, (q_len, k_len) in enumerate(batch.layout.lengths)
    ]
    return masked_attention(batch, masks, scale, head_ids)


def reference_a_shape_attention(
    batch: VarlenBatch,
    num_sink_tokens: torch.Tensor,
    window_len: torch.Tensor,
    scale: float,
    *,
    head_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of `a_shape_attention` (same arguments) -> out [total_q, Hq, D] float32."""
    masks = [a_shape_mask(num_sink_tokens, window_len, q_len, k_len) for q_len, k_len in batch.layout.lengths]
    return masked_attention(batch, masks, scale, head_ids)
