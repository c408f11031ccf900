"""Verification of drafts on the device: which draft tokens a step accepts, and the token after them.

A sequence verifying draft d1..dk has k + 1 logit rows: row i predicts the token after d_i (row 0 the
token after the input). Per row the target distribution p_i is what one-token decoding samples from
(temperature, then the top-p nucleus; greedy is the argmax).

    greedy:    accept d_{i+1} while argmax(p_i) == d_{i+1}; then emit argmax(p_a). The tokens are exactly
               greedy decoding's.
    sampling:  the draft is deterministic (q is one-hot on d), so accept d_{i+1} with probability
               min(1, p_i(d) / q(d)) = p_i(d_{i+1}); at the first rejection emit a sample of p_i with
               d_{i+1} removed and renormalised; when all k are accepted emit a sample of p_k (the bonus
               token). Each emitted token is then distributed as one-token sampling would give it.

A failed gate (carry.py: the draft rested on a wrong guess of the step before) rejects the whole draft
without a test: row 0 then emits a plain sample of p_0, exactly one exact token.

Everything stays on the device; `tokens` [R] (the draft token at accepted rows, the emitted token at
row a, don't-care after) and `accepted` [S] go to the host with the step's other results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from terse.backend.local.staging import to_device_parts
from terse.backend.sampling import greedy_ids, nucleus_probs, row_uniforms
from terse.backend.types import SamplingParams


class VerifyLayout(NamedTuple):
    """Rows of the sequences one step samples, built on the host."""

    first_rows: list[int]
    """Each sequence's first row in the logits."""
    num_rows: list[int]
    """Its rows: 1 + its draft length (1: no draft)."""
    next_draft: list[int]
    """Per row: the draft token the next row was fed (-1 at a sequence's last row)."""

    @classmethod
    def build(cls, drafts: Sequence[Sequence[int]]) -> VerifyLayout:
        """From each sequence's draft tokens (empty: one row), rows in sequence order."""
        first_rows, num_rows, next_draft = [], [], []
        row = 0
        for draft in drafts:
            first_rows.append(row)
            num_rows.append(1 + len(draft))
            next_draft.extend([*draft, -1])
            row += 1 + len(draft)
        return cls(first_rows, num_rows, next_draft)


class Verified(NamedTuple):
    tokens: torch.Tensor
    """[R] int64 (see the module docstring)."""
    accepted: torch.Tensor
    """[S] int64 draft tokens accepted per sequence."""
    last_rows: torch.Tensor
    """[S] int64 the row of each sequence's last emitted token (first row + accepted)."""


def verify(
    logits: torch.Tensor, layout: VerifyLayout, params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None], gate: torch.Tensor | None,
) -> Verified:
    """logits: [R, V] (layout's rows); params, generators: one per sequence; gate: [S] bool or None (all
    pass). Seeded rows draw their uniforms from their sequence's generator: one per row for the emitted
    sample, one per drafted row for the acceptance test. The host indices travel in one copy."""
    device = logits.device
    row_seq = [s for s, n in enumerate(layout.num_rows) for _ in range(n)]
    width = max(layout.num_rows)
    sampled = [r for r, s in enumerate(row_seq) if not params[s].greedy]
    drafted = [i for i, r in enumerate(sampled) if layout.next_draft[r] >= 0]
    next_draft, seq_t, pos_t, first_rows, slots, sampled_t, drafted_t = to_device_parts(
        [
            layout.next_draft, row_seq, [i for n in layout.num_rows for i in range(n)], layout.first_rows,
            [f + i if i < n else -1 for f, n in zip(layout.first_rows, layout.num_rows) for i in range(width)],
            sampled, drafted,
        ],
        device,
    )
    tokens = greedy_ids(logits)  # [R]
    accept = tokens == next_draft  # greedy acceptance; never at a last row (-1)
    if sampled:
        gate_rows = gate.index_select(0, seq_t.index_select(0, sampled_t)) if gate is not None else None
        emitted, accepted_rows = _sample_rows(
            logits.index_select(0, sampled_t), next_draft.index_select(0, sampled_t), gate_rows,
            [params[row_seq[r]] for r in sampled], [generators[row_seq[r]] for r in sampled], drafted, drafted_t,
        )
        tokens.index_copy_(0, sampled_t, emitted)
        accept.index_copy_(0, sampled_t, accepted_rows)
    padded = torch.cat((accept, accept.new_zeros(1)))  # slot -1 reads this False
    accepted = padded[slots.view(-1, width)].long().cumprod(dim=1).sum(dim=1)  # [S] leading accepted rows
    if gate is not None:
        accepted = accepted * gate
    tokens = torch.where(pos_t < accepted.index_select(0, seq_t), next_draft, tokens)
    return Verified(tokens, accepted, first_rows + accepted)


def _sample_rows(
    logits: torch.Tensor, draft: torch.Tensor, gate: torch.Tensor | None, params: list[SamplingParams],
    generators: list[torch.Generator | None], drafted: list[int], drafted_t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling of sampled (non-greedy) rows. logits: [Rs, V]; draft: [Rs] (-1: none); gate:
    [Rs] bool; drafted: the rows with a draft token (`drafted_t` on the device).
    -> (emitted token [Rs], draft accepted [Rs] bool)."""
    device = logits.device
    probs, ids = nucleus_probs(logits, params)  # [Rs, V] sorted, outside the nucleus zeroed
    is_draft = ids == draft[:, None]  # [Rs, V]; no column for -1
    p_draft = (probs * is_draft).sum(dim=-1) / probs.sum(dim=-1)  # [Rs] probability of the draft token
    uniforms = row_uniforms(generators, device)  # [Rs] for the emitted samples
    accept = torch.zeros(len(generators), dtype=torch.bool, device=device)
    if drafted:
        tests = row_uniforms([generators[r] for r in drafted], device)
        accept.index_copy_(0, drafted_t, tests < p_draft.index_select(0, drafted_t))
    removed = is_draft if gate is None else is_draft & gate[:, None]  # a failed gate removes nothing
    residual = probs.masked_fill(removed, 0.0)
    cum = residual.cumsum(dim=-1)  # [Rs, V]
    pick = torch.searchsorted(cum, (uniforms * cum[:, -1])[:, None], right=True).clamp_(max=cum.shape[-1] - 1)
    return ids.gather(-1, pick)[:, 0], accept


