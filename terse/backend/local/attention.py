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
    block_table: torch.Tensor
    """[ceil(context_len / block_size)] int64 block ids."""


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
    prefill_path: str = "dense"
    use_triton_decode: bool = False


class PrefillAttention(Protocol):
    """Attention of one sequence's chunk. q: [q_len, H, D]; k, v: [context_len, KVH, D] (all keys up to
    and including the chunk). Query i sits at position context_len - q_len + i and sees keys <= it.
    Returns [q_len, H, D]."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def dense_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention through torch SDPA (flash / memory-efficient kernels where available)."""
    q_len, ctx_len = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H, S, D]
    if q_len == ctx_len:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
    else:
        offset = ctx_len - q_len
        q_pos = torch.arange(q_len, device=q.device)[:, None] + offset
        mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos  # [q_len, ctx_len]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


# name -> prefill path; a sparse path registers itself here and is chosen with
# EngineConfig.prefill_attention.
PREFILL_PATHS: dict[str, PrefillAttention] = {"dense": dense_prefill}


def register_prefill_path(name: str, path: PrefillAttention) -> None:
    PREFILL_PATHS[name] = path


def gather_kv(layer_kv: torch.Tensor, block_table: torch.Tensor, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """layer_kv: [2, NB, bs, KVH, D], block_table: [nb] -> k, v: [context_len, KVH, D]."""
    kv = layer_kv[:, block_table]  # [2, nb, bs, KVH, D]
    kv = kv.reshape(2, -1, *kv.shape[-2:])[:, :context_len]
    return kv[0], kv[1]


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
    k = layer_kv[0][block_tables].flatten(1, 2)  # [B, S, KVH, D]
    v = layer_kv[1][block_tables].flatten(1, 2)
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor, meta: AttentionMetadata
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
    prefill = PREFILL_PATHS[meta.prefill_path]
    for span in meta.prefills:
        rows = slice(span.q_start, span.q_start + span.q_len)
        if span.context_len == span.q_len:  # nothing cached before the chunk: use the fresh K/V
            span_k, span_v = k[rows], v[rows]
        else:
            span_k, span_v = gather_kv(layer_kv, span.block_table, span.context_len)
        out[rows] = prefill(q[rows], span_k, span_v)
    return out
