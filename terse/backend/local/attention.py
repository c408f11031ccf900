"""Attention over the paged KV cache; picks the path per step.

A step's tokens are laid out flat: first one token per decoding sequence, then the chunks of the
sequences being prefilled:

    flat tokens:  [ d0 d1 d2 | p0 p0 p0 p0 p0 | p1 p1 p1 ]
                    decodes    prefill span 0   prefill span 1
    span 0: q_start=3, q_len=5, context_len=12 -> its queries sit at positions 7..11 and see keys 0..i

Every path first writes the step's K/V into the pool at `slot_mapping` (slot = block * block_size +
offset), then reads keys and values back through block tables, so a chunk sees the prefix cached or
computed in earlier steps. Prefill paths come from `PREFILL_PATHS` (chosen by
`EngineConfig.prefill_attention`); decode uses a batched gather over the block tables in torch, or the
Triton paged-decode kernel on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence's chunk inside the flat batch."""

    q_start: int
    q_len: int
    context_len: int
    """Tokens with KV after this step (cached + earlier chunks + this chunk)."""
    block_table: list[int]
    """Block ids covering the context: ceil(context_len / block_size) of them."""
    sparse: bool = False
    """Attended by the engine's sparse prefill (see sparse_prefill.py), not by the dense paths."""


@dataclass
class PrefillGroup:
    """Prefill spans attended in one padded SDPA call over KV gathered through their block tables.

    The GROUP query heads sharing a KV head are folded into the query axis, so plain (non-GQA) SDPA
    with a boolean mask runs on the memory-efficient kernel:

        q: [N, KVH, GROUP * max_q, D]   k, v: [N, KVH, max_blocks * block_size, D]
        mask[n, 0, g * max_q + i, j] = key j is visible to query i of span n
    """

    span_rows: torch.Tensor
    """[N, max_q] int64 flat row of each query slot (padding slots repeat a valid row)."""
    valid_rows: torch.Tensor
    """[num valid] int64 flat rows, in the order of `valid` below."""
    valid: torch.Tensor
    """[N, max_q] bool: real query slots."""
    block_tables: torch.Tensor
    """[N, max_blocks] int64 (padding: any valid block; masked out)."""
    mask: torch.Tensor
    """[N, 1, GROUP * max_q, max_blocks * block_size] bool."""


@dataclass
class AttentionMetadata:
    """Where each token's KV goes and which KV each query reads. Built by the runner per step."""

    slot_mapping: torch.Tensor
    """[T] int64: pool slot of each token's K/V."""
    num_decode_tokens: int
    """The first `num_decode_tokens` tokens are single-token decodes, one per sequence."""
    decode_block_tables: torch.Tensor
    """[num_decode_tokens, max_blocks] int64 (padding entries point at any valid block)."""
    decode_context_lens: torch.Tensor
    """[num_decode_tokens] int32: keys each decode query sees (its own token included)."""
    prefills: list[PrefillSpan] = field(default_factory=list)
    prefill_groups: list[PrefillGroup] = field(default_factory=list)
    """Batched form of the spans that read cached KV (see `build_prefill_groups`)."""
    prefill_path: str = "dense"
    use_triton_decode: bool = False
    sparse_prefill: SparsePrefillFn | None = None
    """Attends the spans marked `sparse` (set when EngineConfig.sparse_prefill is enabled)."""


class PrefillAttention(Protocol):
    """Attention of every prefill span of a step. q: [T, H, D], k, v: [T, KVH, D] (the step's fresh
    rows); layer_kv: [2, NB, bs, KVH, D] (already holding the step's K/V). Writes the rows of
    `meta.prefills` into `out` ([T, H, D]); span n's query i sits at position context_len - q_len + i
    and sees keys <= it."""

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor,
        meta: AttentionMetadata, out: torch.Tensor,
    ) -> None: ...


class SparsePrefillFn(Protocol):
    """Writes the rows of `meta.prefills` marked sparse into `out`, for layer `layer_index`."""

    def __call__(
        self, q: torch.Tensor, layer_kv: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor, layer_index: int
    ) -> None: ...


# A prompt computed from scratch in one chunk at least this long runs alone on the causal (flash) kernel
# with its fresh K/V; shorter chunks and chunks over cached context are batched through the pool.
MIN_SOLO_PREFILL_LEN = 256


def is_solo_span(span: PrefillSpan) -> bool:
    return span.context_len == span.q_len and span.q_len >= MIN_SOLO_PREFILL_LEN and not span.sparse


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One chunk with all its keys: q: [q_len, H, D]; k, v: [q_len, KVH, D] -> [q_len, H, D]."""
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H, S, D]
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)[0].transpose(0, 1)


def grouped_attention(q: torch.Tensor, layer_kv: torch.Tensor, group: PrefillGroup) -> torch.Tensor:
    """Padded batch of spans (see `PrefillGroup`). q: [T, H, D] -> [num valid rows, H, D]."""
    num_spans, max_q = group.span_rows.shape
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = layer_kv.shape[-2]
    g = num_heads // num_kv_heads
    qp = q[group.span_rows].view(num_spans, max_q, num_kv_heads, g, head_dim)
    qp = qp.permute(0, 2, 3, 1, 4).reshape(num_spans, num_kv_heads, g * max_q, head_dim)
    # index_select over flattened tables: much cheaper than advanced indexing on CPU
    kv = layer_kv.index_select(1, group.block_tables.view(-1))  # [2, N * nb, bs, KVH, D]
    kv = kv.view(2, num_spans, -1, *kv.shape[-2:])  # [2, N, S, KVH, D]
    out = F.scaled_dot_product_attention(qp, kv[0].transpose(1, 2), kv[1].transpose(1, 2), attn_mask=group.mask)
    out = out.view(num_spans, num_kv_heads, g, max_q, head_dim).permute(0, 3, 1, 2, 4)  # [N, max_q, KVH, G, D]
    return out.reshape(num_spans, max_q, num_heads, head_dim)[group.valid]


def dense_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor,
    meta: AttentionMetadata, out: torch.Tensor,
) -> None:
    """Long fresh chunks alone on the causal kernel; all other spans in padded groups."""
    for span in meta.prefills:
        if is_solo_span(span):
            rows = slice(span.q_start, span.q_start + span.q_len)
            out[rows] = causal_attention(q[rows], k[rows], v[rows])
    for group in meta.prefill_groups:
        out[group.valid_rows] = grouped_attention(q, layer_kv, group)


# name -> prefill path; a sparse path registers itself here and is chosen with
# EngineConfig.prefill_attention.
PREFILL_PATHS: dict[str, PrefillAttention] = {"dense": dense_prefill}


def build_prefill_groups(
    spans: list[PrefillSpan], *, block_size: int, num_q_per_kv: int, device: torch.device,
    max_key_rows: int = 1 << 18,
) -> list[PrefillGroup]:
    """Pack the non-solo spans, longest context first, into groups of at most `max_key_rows` padded
    keys (N * max_blocks * block_size), and build their index and mask tensors once per step."""
    todo = sorted((s for s in spans if not is_solo_span(s) and not s.sparse), key=lambda s: -s.context_len)
    groups: list[list[PrefillSpan]] = []
    for span in todo:
        # Sorted by context, so a group's first span sets its padded key length.
        if groups and (len(groups[-1]) + 1) * _padded_len(groups[-1][0], block_size) <= max_key_rows:
            groups[-1].append(span)
        else:
            groups.append([span])
    return [_make_group(g, block_size, num_q_per_kv, device) for g in groups]


def _padded_len(span: PrefillSpan, block_size: int) -> int:
    return -(-span.context_len // block_size) * block_size


def _make_group(spans: list[PrefillSpan], block_size: int, g: int, device: torch.device) -> PrefillGroup:
    max_q = max(s.q_len for s in spans)
    max_blocks = max(len(s.block_table) for s in spans)
    rows = [s.block_table + [s.block_table[0]] * (max_blocks - len(s.block_table)) for s in spans]
    tables = torch.tensor(rows, dtype=torch.int64, device=device)
    q_len = torch.tensor([s.q_len for s in spans], device=device)[:, None]  # [N, 1]
    ctx = torch.tensor([s.context_len for s in spans], device=device)[:, None, None]  # [N, 1, 1]
    start = torch.tensor([s.q_start for s in spans], device=device)[:, None]
    i = torch.arange(max_q, device=device)[None, :]  # [1, max_q]
    valid = i < q_len  # [N, max_q]
    span_rows = start + torch.where(valid, i, 0)
    j = torch.arange(max_blocks * block_size, device=device)[None, None, :]
    mask = (j <= (ctx - q_len[:, :, None]) + i[:, :, None]) & (j < ctx)  # [N, max_q, S]
    mask = mask[:, None].expand(-1, g, -1, -1).reshape(len(spans), 1, g * max_q, -1)
    return PrefillGroup(span_rows, span_rows[valid], valid, tables, mask)


def register_prefill_path(name: str, path: PrefillAttention) -> None:
    PREFILL_PATHS[name] = path


def paged_decode_torch(
    q: torch.Tensor, layer_kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> torch.Tensor:
    """One query per sequence over its paged keys. q: [B, H, D] -> [B, H, D].

    Gathers [B, max_blocks * bs] keys; positions past each context length are masked out. Shapes
    depend only on (B, max_blocks), so the path can be captured in a CUDA graph.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = layer_kv.shape[-2]
    group = num_heads // num_kv_heads
    flat_tables = block_tables.reshape(-1)
    k = layer_kv[0].index_select(0, flat_tables).view(num_seqs, -1, *layer_kv.shape[-2:])  # [B, S, KVH, D]
    v = layer_kv[1].index_select(0, flat_tables).view(num_seqs, -1, *layer_kv.shape[-2:])
    qg = q.view(num_seqs, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k.float()) * head_dim**-0.5  # [B, KVH, G, S]
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]  # [B, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgs,bskd->bkgd", probs, v.float())  # [B, KVH, G, D]
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def paged_decode_supported(block_size: int, head_dim: int) -> bool:
    """Whether the Triton paged-decode kernel handles this pool layout (else the torch path runs)."""
    return block_size >= 16 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _decode_fn(meta: AttentionMetadata) -> DecodeFn:
    if meta.use_triton_decode:
        from terse.backend.local.paged_decode import paged_decode_triton

        return paged_decode_triton
    return paged_decode_torch


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor, meta: AttentionMetadata,
    layer_index: int = 0,
) -> torch.Tensor:
    """q: [T, H, D], k, v: [T, KVH, D] for the step's tokens; layer_kv: [2, NB, bs, KVH, D]
    (mutated: the step's K/V are written in). Returns [T, H, D]."""
    flat_kv = layer_kv.view(2, -1, *layer_kv.shape[-2:])  # [2, NB * bs, KVH, D]
    flat_kv[0].index_copy_(0, meta.slot_mapping, k)
    flat_kv[1].index_copy_(0, meta.slot_mapping, v)
    num_dec = meta.num_decode_tokens
    if not meta.prefills:
        return _decode_fn(meta)(q, layer_kv, meta.decode_block_tables, meta.decode_context_lens)
    out = torch.empty_like(q)
    if num_dec:
        out[:num_dec] = _decode_fn(meta)(q[:num_dec], layer_kv, meta.decode_block_tables, meta.decode_context_lens)
    PREFILL_PATHS[meta.prefill_path](q, k, v, layer_kv, meta, out)
    if meta.sparse_prefill is not None:
        meta.sparse_prefill(q, layer_kv, meta, out, layer_index)
    return out
