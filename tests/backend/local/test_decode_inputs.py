"""Decode-step inputs on CPU: the flat layout a CUDA graph reads (`DecodeLayout`), filled by one copy into
a given buffer, against the eager layout and the slot formula; `take_carry`'s one-copy path against its
general path."""

from __future__ import annotations

import pytest
import torch

from terse.backend.local import carry as carry_module
from terse.backend.local.carry import NO_GATES, DecodeRows, StepCarry, take_carry
from terse.backend.local.inputs import (
    DecodeBatch,
    DecodeLayout,
    fill_decode,
    prepare_decode,
    send_decode,
    spread_decode,
)
from terse.backend.local.kv_policy import DENSE, SeqKV
from terse.backend.local.scheduler import ScheduledChunk
from terse.backend.local.sequence import PENDING_TOKEN, Draft, Sequence
from terse.backend.types import SamplingParams

BLOCK_SIZE, SCRATCH, CPU = 4, 99, torch.device("cpu")


def _chunk(
    seq_id: int, tokens: list[int], blocks: list[int], *, draft: Draft | None = None, dropped: int = 0,
    speculative: int = 0,
) -> ScheduledChunk:
    """A decode chunk whose input is the last of `tokens` (KV computed for all before it)."""
    seq = Sequence(seq_id, tokens, SamplingParams(max_tokens=8), max_len=256)
    seq.num_computed_tokens = len(tokens) - 1
    seq.num_speculative_tokens = speculative
    num_rows = 1 + (len(draft.tokens) if draft is not None else 0)
    return ScheduledChunk(seq, num_rows, SeqKV(DENSE, blocks, num_dropped_tokens=dropped), draft)


def _expected(chunks: list[ScheduledChunk], size: int, width: int) -> DecodeBatch:
    """The decode rows by the definition (inputs.py): a row per input and draft token, padding after."""
    ids, pos, slots, lens = [0] * size, [0] * size, [SCRATCH * BLOCK_SIZE] * size, [1] * size
    tables = [[SCRATCH] * width for _ in range(size)]
    row = 0
    for chunk in chunks:
        seq, kv = chunk.seq, chunk.kv
        inputs = [max(seq.token_ids[seq.num_computed_tokens], 0), *(chunk.draft.tokens if chunk.draft else ())]
        for i, token in enumerate(inputs):
            p = seq.num_computed_tokens + i
            c = p - kv.num_dropped_tokens
            ids[row], pos[row], lens[row] = token, p, c + 1
            slots[row] = kv.block_ids[c // BLOCK_SIZE] * BLOCK_SIZE + c % BLOCK_SIZE
            tables[row][: len(kv.block_ids)] = kv.block_ids
            row += 1
    t = torch.tensor
    return DecodeBatch(t(ids), t(pos), t(slots), t(tables), t(lens))


def _chunks() -> list[ScheduledChunk]:
    return [
        _chunk(0, [5, 6, 7, 8, 9, 10], [3, 4]),
        _chunk(1, [1, 2, PENDING_TOKEN], [7]),  # input still on the device: 0 here
        _chunk(2, list(range(11, 20)), [8, 9, 10], draft=Draft((40, 41, 42))),  # crosses into block 10
        _chunk(3, list(range(30)), [12, 13], dropped=24),  # a streaming table: released blocks skipped
    ]


def _assert_equal(got: DecodeBatch, want: DecodeBatch) -> None:
    for name, a, b in zip(DecodeBatch._fields, got, want):
        assert a.dtype == torch.int64 and torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"


@pytest.mark.parametrize("size", [7, 8, 16])
def test_eager_layout_is_as_wide_as_the_longest_table(size: int) -> None:
    chunks = _chunks()
    layout = DecodeLayout.fit(chunks, size)
    assert layout == DecodeLayout(size, 3)
    _assert_equal(prepare_decode(chunks, layout, BLOCK_SIZE, SCRATCH, CPU), _expected(chunks, size, 3))


def test_one_copy_lands_a_graph_layout_in_place() -> None:
    """A graph's static buffer holds the largest size's layout; a step of size 8 fills its first entries
    at the full table width, with what the eager layout holds (its tables padded with the scratch block)."""
    chunks, width, size = _chunks(), 6, 8
    static = torch.full((DecodeLayout(16, width).num_elements,), -7, dtype=torch.int64)
    layout = DecodeLayout(size, width)
    batch = prepare_decode(chunks, layout, BLOCK_SIZE, SCRATCH, CPU, dest=static[: layout.num_elements])
    _assert_equal(batch, _expected(chunks, size, width))
    assert all(t.data_ptr() == static[i].data_ptr() for t, i in zip(batch, (0, size, 2 * size, 4 * size, 3 * size)))
    assert torch.equal(static[layout.num_elements :], torch.full_like(static[layout.num_elements :], -7))
    _assert_equal(layout.views(static), batch)  # the graph's views of the whole buffer see the same
    eager = prepare_decode(chunks, DecodeLayout.fit(chunks, size), BLOCK_SIZE, SCRATCH, CPU)
    for name in ("input_ids", "positions", "slot_mapping", "context_lens"):
        assert torch.equal(getattr(batch, name), getattr(eager, name)), name
    assert torch.equal(batch.block_tables[:, :3], eager.block_tables)
    assert (batch.block_tables[:, 3:] == SCRATCH).all()


def test_fill_rewrites_every_entry_of_its_layout() -> None:
    """A step overwrites whatever the step before left in the buffer (the graph sizes share it)."""
    layout, chunks = DecodeLayout(8, 5), _chunks()
    stale, fresh = torch.full((layout.num_elements,), 12345, dtype=torch.int64), torch.empty(layout.num_elements, dtype=torch.int64)
    fill_decode(stale.numpy(), layout, chunks, BLOCK_SIZE, SCRATCH)
    fill_decode(fresh.numpy(), layout, chunks, BLOCK_SIZE, SCRATCH)
    assert torch.equal(stale, fresh) and not (stale == 12345).any()


# -- take_carry ----------------------------------------------------------------------------------


def _pending(seq_id: int, blocks: list[int], *, draft: Draft | None = None, speculative: int = 0) -> ScheduledChunk:
    return _chunk(seq_id, [3, 1, 4, 1, 5, PENDING_TOKEN], blocks, draft=draft, speculative=speculative)


CARRY_TOKENS = [101, 102, 103, 104, 105, 106]


def _carry(seq_rows: dict[int, tuple[int, int]], *, last_rows: list[int] | None = None,
           accepted: list[int] | None = None) -> StepCarry:
    t = torch.tensor
    return StepCarry(t(CARRY_TOKENS), None if last_rows is None else t(last_rows),
                     None if accepted is None else t(accepted), seq_rows)


# (chunks, carry, input ids after, whether one copy fills them)
CASES = {
    "all pending, in order": (
        lambda: [_pending(0, [1, 2]), _pending(1, [3, 4]), _pending(2, [5, 6])],
        lambda: _carry({0: (0, 0), 1: (1, 1), 2: (2, 2), 9: (3, 3)}), [101, 102, 103], True),
    "pending first, then known": (
        lambda: [_pending(0, [1, 2]), _chunk(1, [2, 7], [3])],
        lambda: _carry({0: (0, 0)}), [101, 7], True),
    "known first": (
        lambda: [_chunk(1, [2, 7], [3]), _pending(0, [1, 2])],
        lambda: _carry({0: (0, 0)}), [7, 101], False),
    "carry rows swapped": (
        lambda: [_pending(0, [1, 2]), _pending(1, [3, 4])],
        lambda: _carry({0: (1, 1), 1: (0, 0)}), [102, 101], False),
    "carry rows past a finished sequence": (
        lambda: [_pending(0, [1, 2]), _pending(1, [3, 4])],
        lambda: _carry({0: (0, 0), 1: (2, 2)}), [101, 103], False),
    "the carry verified drafts": (
        lambda: [_pending(0, [1, 2]), _pending(1, [3, 4])],
        lambda: _carry({0: (0, 0), 1: (1, 1)}, last_rows=[3, 5], accepted=[0, 0]), [104, 106], False),
    "shifted": (
        lambda: [_pending(0, [1, 2], speculative=2), _pending(1, [3, 4])],
        lambda: _carry({0: (0, 0), 1: (1, 1)}, last_rows=[0, 1], accepted=[1, 0]), [101, 102], False),
    "draft on a guess": (
        lambda: [_pending(0, [1, 2], draft=Draft((9,), guess=101))],
        lambda: _carry({0: (0, 0)}), [101, 9], False),
}


def _take(chunks: list[ScheduledChunk], carry: StepCarry) -> tuple[DecodeBatch, int, object]:
    batch = prepare_decode(chunks, DecodeLayout.fit(chunks, 4), BLOCK_SIZE, SCRATCH, CPU)
    num_filled, gates = take_carry(DecodeRows(*batch), chunks, carry, BLOCK_SIZE)
    return batch, num_filled, gates


@pytest.mark.parametrize("case", CASES)
def test_take_carry_one_copy_path_equals_the_general_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make_chunks, make_carry, want_ids, one_copy = CASES[case]
    sends = []
    real_send = carry_module.to_device_parts
    monkeypatch.setattr(carry_module, "to_device_parts", lambda *a: sends.append(1) or real_send(*a))
    batch, num_filled, gates = _take(make_chunks(), make_carry())
    assert batch.input_ids[: len(want_ids)].tolist() == want_ids
    assert (not sends) is one_copy  # the one-copy path sends no indices
    monkeypatch.setattr(carry_module, "_in_place", lambda *a: False)
    general, general_filled, general_gates = _take(make_chunks(), make_carry())
    _assert_equal(batch, general)
    assert num_filled == general_filled
    if one_copy:
        assert gates is NO_GATES and general_gates is NO_GATES


def test_a_step_sent_at_its_own_width_spreads_into_the_wide_graph_layout() -> None:
    """Where the full-width layout is large (long max_model_len), a step goes over at its batch's table width
    and is spread into the static buffer: the vectors and each row's first entries as the one-copy path
    writes them; entries past the batch's width keep what they held (no row reads them)."""
    chunks, size, wide_width = _chunks(), 8, 6
    layout = DecodeLayout.fit(chunks, size)
    flat = send_decode(chunks, layout, BLOCK_SIZE, SCRATCH, CPU)
    static = torch.full((DecodeLayout(16, wide_width).num_elements,), -7, dtype=torch.int64)
    wide = DecodeLayout(size, wide_width)
    got = spread_decode(flat, layout, static[: wide.num_elements], wide)
    want = _expected(chunks, size, layout.width)
    _assert_equal(got._replace(block_tables=got.block_tables[:, : layout.width]), want)
    assert bool((got.block_tables[:, layout.width :] == -7).all())
    assert bool((static[wide.num_elements :] == -7).all())
    assert got.input_ids.data_ptr() == static.data_ptr()  # views of the static buffer
    with pytest.raises(ValueError, match="does not spread"):
        spread_decode(flat, layout, static, DecodeLayout(size, 2))


def test_graph_steps_spread_only_when_the_wide_layout_is_large() -> None:
    from terse.backend.local.runner import FULL_WIDTH_COPY_BYTES

    assert DecodeLayout(32, 256).num_elements * 8 <= FULL_WIDTH_COPY_BYTES  # 4K tokens, 16-token blocks: one copy
    assert DecodeLayout(32, 8192).num_elements * 8 > FULL_WIDTH_COPY_BYTES  # 128K tokens: sent at the batch's width
