"""What a launched step leaves on the device for the next one, and how the next step's inputs take it.

The engine launches step N+1 before step N's results reach the host (engine.py). A sequence decoding
in both takes three things from step N on the device, never through the host:

- its input token: the last token step N produced for it (the sampled token, or the token after the
  draft tokens step N accepted);
- when step N verified a draft: the number of draft tokens it accepted, added to the positions of all
  the sequence's rows in step N+1 (their KV slots and context lengths follow);
- when step N+1's draft was built on a guess of step N's outcome (speculative.py): the gate, true when
  step N accepted the assumed number of draft tokens and its last token equals the guess.

    step N:     rows  x d1 d2 d3       accepted 2 -> tokens d1 d2 y;  last row = first row + 2
    step N+1:   rows  y c1 c2          positions p + 2 ..; gate = (2 == assumed) & (y == guess)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from terse.backend.local.scheduler import ScheduledChunk
from terse.backend.local.sequence import PENDING_TOKEN
from terse.backend.local.staging import to_device_parts


class StepCarry(NamedTuple):
    """A launched step's per-sequence results, left on the device for the next step."""

    tokens: torch.Tensor
    """[R] int64: the token each sampled row yields (constrained rows written by `sample_late`, before
    the next launch)."""
    last_rows: torch.Tensor | None
    """[S] int64: the row of each sampled sequence's last token (None: every sequence had one row)."""
    accepted: torch.Tensor | None
    """[S] int64: draft tokens each sampled sequence accepted (None: the step verified no draft)."""
    seq_rows: dict[int, tuple[int, int]]
    """seq_id -> (its index in [S], its first row in [R])."""


class DecodeRows(NamedTuple):
    """Views of the next step's decode-row inputs (the first rows of its flat batch), mutated in place."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor


class Gates(NamedTuple):
    """Device-decided gates of the drafts built on a guess (see the module docstring)."""

    seq_ids: list[int]
    values: torch.Tensor | None
    """[len(seq_ids)] bool (None when no draft guessed)."""


NO_GATES = Gates([], None)


def take_carry(rows: DecodeRows, chunks: list[ScheduledChunk], carry: StepCarry | None, block_size: int) -> tuple[int, Gates]:
    """Fill the decode inputs still on the device from `carry` (the step launched just before); shift the
    rows of sequences whose step in flight verified a draft. Returns (inputs filled, gates). All the host
    indices travel in one copy."""
    pending: list[tuple[int, ScheduledChunk, int, int]] = []  # (first row here, chunk, index in carry, row there)
    row = 0
    for chunk in chunks:
        seq = chunk.seq
        if seq.token_ids[seq.num_computed_tokens] == PENDING_TOKEN:
            assert carry is not None, "a pending input needs the step before on the device"
            s, first = carry.seq_rows[seq.seq_id]
            pending.append((row, chunk, s, first))
        row += chunk.num_new_tokens
    if not pending:
        return 0, NO_GATES
    assert carry is not None
    if _in_place(pending, carry):
        # pending rows 0..P-1 take carry rows 0..P-1: one copy, no indices to send
        rows.input_ids[: len(pending)].copy_(carry.tokens[: len(pending)])
        return len(pending), NO_GATES
    shifted = [(r, c, s) for r, c, s, _ in pending if c.seq.num_speculative_tokens]
    guessed = [(j, c.draft) for j, (_, c, _, _) in enumerate(pending) if c.draft is not None and c.draft.guess is not None]
    dst, s_index, first_rows, shift_rows, shift_seqs, g_index, assumed, guess = to_device_parts(
        [
            [r for r, _, _, _ in pending], [s for _, _, s, _ in pending], [f for _, _, _, f in pending],
            [r + i for r, c, _ in shifted for i in range(c.num_new_tokens)],
            [s for _, c, s in shifted for _ in range(c.num_new_tokens)],
            [j for j, _ in guessed], [d.assumed_accepted for _, d in guessed], [d.guess or 0 for _, d in guessed],
        ],
        rows.input_ids.device,
    )
    src = first_rows if carry.last_rows is None else carry.last_rows.index_select(0, s_index)
    x = carry.tokens.index_select(0, src)  # [P] each sequence's input token
    rows.input_ids.index_copy_(0, dst, x)
    if shifted:
        assert carry.accepted is not None, "a shifted sequence's previous step verified a draft"
        _shift(rows, shift_rows, carry.accepted.index_select(0, shift_seqs), block_size)
    if not guessed:
        return len(pending), NO_GATES
    accepted = carry.accepted.index_select(0, s_index.index_select(0, g_index)) if carry.accepted is not None else 0
    gate = (accepted == assumed) & (x.index_select(0, g_index) == guess)
    return len(pending), Gates([pending[j][1].seq.seq_id for j, _ in guessed], gate)


def _in_place(pending: list[tuple[int, ScheduledChunk, int, int]], carry: StepCarry) -> bool:
    """True when the general path would only copy carry.tokens[j] into row j for j < P: the pending
    chunks' rows here and their rows in the carry are both 0..P-1 in order (so the carry's rows are its
    sequences' input tokens: `last_rows` is None), no sequence is shifted and no draft guessed."""
    return carry.last_rows is None and all(
        row == j and first == j and not chunk.seq.num_speculative_tokens
        and (chunk.draft is None or chunk.draft.guess is None)
        for j, (row, chunk, _, first) in enumerate(pending)
    )


def _shift(rows: DecodeRows, index: torch.Tensor, accepted: torch.Tensor, block_size: int) -> None:
    """Move the rows `index` by `accepted` positions (the draft tokens their sequence's previous step
    accepted); their KV slots and context lengths follow."""
    rows.positions.index_add_(0, index, accepted)
    rows.context_lens.index_add_(0, index, accepted)
    c = rows.context_lens.index_select(0, index) - 1  # each row's index in its block table
    blocks = rows.block_tables.index_select(0, index).gather(1, (c // block_size)[:, None])[:, 0]
    rows.slot_mapping.index_copy_(0, index, blocks * block_size + c % block_size)
