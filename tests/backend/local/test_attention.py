"""Prefill attention over the paged pool (solo causal chunks and padded groups) against plain softmax
attention computed per sequence."""

from __future__ import annotations

import torch

from terse.backend.local.attention import AttentionBackend, PrefillSpan, build_prefill_groups
from terse.kernels.decode_reference import paged_decode_reference

BS, KVH, H, D = 4, 2, 6, 8


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: [q_len, H, D]; k, v: [ctx, KVH, D]; queries are the last q_len positions."""
    q_len, ctx = q.shape[0], k.shape[0]
    k, v = k.repeat_interleave(H // KVH, dim=1), v.repeat_interleave(H // KVH, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    visible = torch.arange(ctx)[None, :] <= torch.arange(q_len)[:, None] + ctx - q_len
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def test_solo_and_grouped_spans_match_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    num_blocks = 128
    pool = torch.randn(2, num_blocks + 1, BS, KVH, D, generator=gen)
    # (context already cached, new tokens): a long fresh prompt (solo), a chunk over cached context,
    # a short fresh prompt, a one-token chunk.
    shapes = [(0, 300), (37, 7), (0, 5), (12, 1)]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    spans: list[PrefillSpan] = []
    slots: list[int] = []
    q_rows = 0
    for cached, new in shapes:
        ctx = cached + new
        table = [perm.pop() for _ in range(-(-ctx // BS))]
        spans.append(PrefillSpan(q_rows, new, ctx, table))
        slots += [table[p // BS] * BS + p % BS for p in range(cached, ctx)]
        q_rows += new
    num_tokens = q_rows
    q = torch.randn(num_tokens, H, D, generator=gen)
    k = torch.randn(num_tokens, KVH, D, generator=gen)
    v = torch.randn(num_tokens, KVH, D, generator=gen)
    cpu = torch.device("cpu")
    backend = AttentionBackend(decode=paged_decode_reference, block_size=BS, num_q_per_kv=H // KVH, device=cpu)
    plan = backend.plan(torch.tensor(slots), torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), spans)
    assert len(plan.prefill_groups) == 1  # the 300-token prompt runs alone, the rest in one padded group
    plan.prefill_groups = build_prefill_groups(spans, block_size=BS, num_q_per_kv=H // KVH, device=cpu, max_key_rows=64)
    assert len(plan.prefill_groups) == 2  # at most 64 padded keys per group splits the rest
    flat = pool.view(2, -1, KVH, D)
    flat[0, torch.tensor(slots)] = k  # the model's rope-and-store op writes the step's K/V first
    flat[1, torch.tensor(slots)] = v
    out = plan.attend(q, k, v, pool, 0)
    for span in spans:
        table_slots = torch.tensor([b * BS + o for b in span.block_table for o in range(BS)])[: span.context_len]
        rows = slice(span.q_start, span.q_start + span.q_len)
        expected = reference(q[rows], flat[0, table_slots], flat[1, table_slots])
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)
