"""Attention over the paged KV cache: a backend built once per engine, a plan built once per step.

A step's tokens are laid out flat: first one token per decoding sequence, then the chunks of the
sequences being prefilled:

    flat tokens:  [ d0 d1 d2 | p0 p0 p0 p0 p0 | p1 p1 p1 ]
                    decodes    prefill span 0   prefill span 1
    span 0: q_start=3, q_len=5, context_len=12 -> its queries sit at positions 7..11 and see keys 0..i

Before attention runs, each layer has written the step's K/V into the pool at `plan.slot_mapping`
(slot = block * block_size + offset; see the model's rope-and-store op); attention then reads keys and
values through block tables, so a chunk sees the prefix cached or computed in earlier steps.

A decode row that verifies a draft token is a decode query like any other (its own context length,
one longer than the row before it: see inputs.py). The Triton kernel reads each row's keys itself, which
is what the CUDA graphs capture. The torch path (eager) instead attends each sequence's decode rows
together over its keys gathered once, in padded SDPA groups (`decode_groups`: one-row sequences in one
group, sequences verifying a draft in another): gathering the keys per row would cost k + 1 times as
much, and even a single row runs faster through SDPA than through the per-row reference.

`AttentionBackend.plan` turns the step's layout into index tensors once (decode tables, padded prefill
groups and their masks, the sparse prefill's gather indices); every layer's `AttentionPlan.attend`
reuses them. Decode runs the Triton paged-decode kernel on CUDA (terse.kernels.paged_decode) or the
torch gather path; prefill runs long fresh chunks alone on the causal kernel, the rest in padded SDPA
groups, and long uncached chunks through the sparse prefill when it is on (sparse_prefill.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from terse.backend.local.staging import to_device

if TYPE_CHECKING:
    from terse.backend.local.sparse_prefill import SparsePlan, SparsePrefill


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
    """[num valid] int64 flat rows of the real query slots, span by span."""
    valid_slots: torch.Tensor
    """[num valid] int64 index of those slots in the [N * max_q] padded layout (an index, not a mask:
    boolean masking would wait for the device)."""
    block_tables: torch.Tensor
    """[N, max_blocks] int64 (padding: any valid block; masked out)."""
    mask: torch.Tensor
    """[N, 1, GROUP * max_q, max_blocks * block_size] bool."""


DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(q [B, H, D], layer_kv [2, NB, bs, KVH, D], block_tables [B, W] int, context_lens [B] int) -> [B, H, D]."""


@dataclass
class AttentionPlan:
    """One step's attention indices, built once and read by every layer."""

    backend: AttentionBackend
    slot_mapping: torch.Tensor
    """[T] int64: pool slot of each token's K/V."""
    num_decode_tokens: int
    """The first `num_decode_tokens` tokens are decode rows: one per decoding sequence, plus one per
    draft token it verifies."""
    decode_block_tables: torch.Tensor
    """[num_decode_tokens, W] int64 (entries past a sequence's blocks: any valid block, never read past
    its context length)."""
    decode_context_lens: torch.Tensor
    """[num_decode_tokens] int64: keys each decode query sees (its own token included)."""
    prefills: list[PrefillSpan] = field(default_factory=list)
    decode_groups: list[PrefillGroup] = field(default_factory=list)
    """Torch path: the decode rows attended per sequence over keys gathered once (empty: every decode
    row goes through the backend's decode kernel)."""
    prefill_groups: list[PrefillGroup] = field(default_factory=list)
    """Batched form of the dense spans that read cached KV (see `build_prefill_groups`)."""
    sparse: SparsePlan | None = None
    """Gather indices of the spans marked sparse (None when there are none)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor, layer_index: int) -> torch.Tensor:
        """q: [T, H, D], k, v: [T, KVH, D] (the step's rotated K and V, already in `layer_kv`
        [2, NB, bs, KVH, D]). Returns [T, H, D]."""
        return self.backend.attend(q, k, v, layer_kv, self, layer_index)


class AttentionBackend:
    """The attention paths of one engine, fixed at construction: the decode kernel, dense prefill,
    and the sparse prefill (None when off)."""

    def __init__(
        self, *, decode: DecodeFn, block_size: int, num_q_per_kv: int, device: torch.device,
        sparse_prefill: SparsePrefill | None = None, group_decode_rows: bool = False,
    ) -> None:
        self.decode = decode
        self.group_decode_rows = group_decode_rows
        """Attend each sequence's decode rows together over its keys gathered once (`decode_groups`)
        instead of through `decode` row by row (the torch path; CUDA graphs always use `decode`)."""
        self.block_size = block_size
        self.num_q_per_kv = num_q_per_kv
        self.device = device
        self.sparse_prefill = sparse_prefill

    def plan(
        self, slot_mapping: torch.Tensor, decode_block_tables: torch.Tensor, decode_context_lens: torch.Tensor,
        prefills: list[PrefillSpan] | None = None, decode_rows: list[tuple[int, int]] | None = None,
    ) -> AttentionPlan:
        """The step's plan: decode tensors as given, prefill groups and the sparse plan built here.
        `decode_rows`: (first row, rows) of each decoding sequence, one-row sequences first; grouped when
        `group_decode_rows` (None: every decode row goes through `decode`)."""
        spans = prefills or []
        sparse_spans = [s for s in spans if s.sparse]
        sparse_plan = None
        if sparse_spans:
            assert self.sparse_prefill is not None, "a span marked sparse needs the sparse prefill"
            sparse_plan = self.sparse_prefill.plan(sparse_spans, self.block_size, self.device)
        groups = build_prefill_groups(
            spans, block_size=self.block_size, num_q_per_kv=self.num_q_per_kv, device=self.device
        )
        decode_groups = []
        if decode_rows and self.group_decode_rows:
            for rows in ([r for r in decode_rows if r[1] == 1], [r for r in decode_rows if r[1] > 1]):
                if rows:
                    decode_groups.append(
                        decode_group(rows, decode_block_tables, decode_context_lens, self.block_size, self.num_q_per_kv)
                    )
        return AttentionPlan(
            self, slot_mapping, len(decode_context_lens), decode_block_tables, decode_context_lens, spans,
            decode_groups, groups, sparse_plan,
        )

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor, plan: AttentionPlan,
        layer_index: int,
    ) -> torch.Tensor:
        num_dec = plan.num_decode_tokens
        if not plan.prefills and not plan.decode_groups:
            return self.decode(q, layer_kv, plan.decode_block_tables, plan.decode_context_lens)
        out = torch.empty_like(q)
        if plan.decode_groups:
            for group in plan.decode_groups:
                out[group.valid_rows] = grouped_attention(q, layer_kv, group)
        elif num_dec:
            out[:num_dec] = self.decode(q[:num_dec], layer_kv, plan.decode_block_tables, plan.decode_context_lens)
        for span in plan.prefills:
            if is_solo_span(span):
                rows = slice(span.q_start, span.q_start + span.q_len)
                out[rows] = causal_attention(q[rows], k[rows], v[rows])
        for group in plan.prefill_groups:
            out[group.valid_rows] = grouped_attention(q, layer_kv, group)
        if plan.sparse is not None:
            assert self.sparse_prefill is not None
            self.sparse_prefill.run(q, layer_kv, plan.sparse, out, layer_index)
        return out


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
    return out.reshape(num_spans * max_q, num_heads, head_dim).index_select(0, group.valid_slots)


def build_prefill_groups(
    spans: list[PrefillSpan], *, block_size: int, num_q_per_kv: int, device: torch.device,
    max_key_rows: int = 1 << 18,
) -> list[PrefillGroup]:
    """Pack the dense non-solo spans, longest context first, into groups of at most `max_key_rows`
    padded keys (N * max_blocks * block_size), and build their index and mask tensors."""
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
    tables = to_device(rows, torch.int64, device)
    q_len = to_device([s.q_len for s in spans], torch.int64, device)[:, None]  # [N, 1]
    ctx = to_device([s.context_len for s in spans], torch.int64, device)[:, None, None]  # [N, 1, 1]
    start = to_device([s.q_start for s in spans], torch.int64, device)[:, None]
    i = torch.arange(max_q, device=device)[None, :]  # [1, max_q]
    span_rows = start + torch.where(i < q_len, i, 0)  # [N, max_q]
    valid_rows = [s.q_start + r for s in spans for r in range(s.q_len)]
    valid_slots = [n * max_q + r for n, s in enumerate(spans) for r in range(s.q_len)]
    j = torch.arange(max_blocks * block_size, device=device)[None, None, :]
    mask = (j <= (ctx - q_len[:, :, None]) + i[:, :, None]) & (j < ctx)  # [N, max_q, S]
    mask = mask[:, None].expand(-1, g, -1, -1).reshape(len(spans), 1, g * max_q, -1)
    return PrefillGroup(
        span_rows, to_device(valid_rows, torch.int64, device), to_device(valid_slots, torch.int64, device), tables, mask
    )


def decode_group(
    rows: list[tuple[int, int]], block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, g: int
) -> PrefillGroup:
    """Decode rows of some sequences as one padded group: each sequence's rows attend its keys, gathered
    once, row i seeing the first context_lens[row i] of them (lengths the device may have shifted).
    rows: (first row, number of rows) per sequence; block_tables [R, W], context_lens [R] of the decode rows."""
    device = context_lens.device
    max_q = max(n for _, n in rows)
    first = to_device([f for f, _ in rows], torch.int64, device)
    num = to_device([n for _, n in rows], torch.int64, device)[:, None]  # [N, 1]
    i = torch.arange(max_q, device=device)[None, :]
    span_rows = first[:, None] + torch.where(i < num, i, 0)  # [N, max_q]
    valid_rows = [f + r for f, n in rows for r in range(n)]
    valid_slots = [k * max_q + r for k, (_, n) in enumerate(rows) for r in range(n)]
    tables = block_tables.index_select(0, first)  # [N, W]
    j = torch.arange(tables.shape[1] * block_size, device=device)[None, None, :]
    mask = j < context_lens[span_rows][:, :, None]  # [N, max_q, S]: causal, the lengths grow row by row
    mask = mask[:, None].expand(-1, g, -1, -1).reshape(len(rows), 1, g * max_q, -1)
    return PrefillGroup(
        span_rows, to_device(valid_rows, torch.int64, device), to_device(valid_slots, torch.int64, device), tables, mask
    )


def triton_decode_supported(block_size: int, head_dim: int) -> bool:
    """Whether the Triton paged-decode kernel handles this pool layout (else the torch path runs)."""
    return block_size >= 16 and head_dim >= 16 and head_dim & (head_dim - 1) == 0
