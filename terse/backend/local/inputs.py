"""Host-side step inputs: a `StepPlan` -> the tensors the model reads, built once per step.

Per token the runner provides its id, its RoPE position p and its KV slot:

    slot(p) = block_ids[c // block_size] * block_size + c % block_size,  c = p - num_dropped_tokens

(c = p for the dense cache; a streaming sequence's table skips its released blocks, see streaming.py).
Integers are packed into one pinned host buffer (`DecodeLayout`) and sent with one non-blocking copy:
into a new device buffer, or into a CUDA graph's static inputs.

A decode input may still be on the device (`PENDING_TOKEN`: sampled by the step launched just before
and not yet read back); its row gets 0 here and the runner copies the sampled id in on the device.

A decode chunk that verifies a draft takes one row per token, each a decode query of its own over the
sequence's block table, its context one longer than the row before (causal attention within the chunk):

    rows:       x   d1   d2   d3          x: the input token, d: the draft
    positions:  p   p+1  p+2  p+3         (+ the accepted count of the step in flight, added on the device
    context:    c+1 c+2  c+3  c+4          when that step verified a draft: see carry.py)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from terse.backend.local.attention import PrefillSpan
from terse.backend.local.scheduler import ScheduledChunk
from terse.backend.local.staging import pinned_empty, send, send_into


class DecodeBatch(NamedTuple):
    """One decode step's inputs, padded to `size` rows (padding rows: id 0, position 0, the scratch
    slot and block, context length 1): a row per input token and per draft token. The CUDA graphs take
    exactly these tensors."""

    input_ids: torch.Tensor
    """[size] int64."""
    positions: torch.Tensor
    """[size] int64."""
    slot_mapping: torch.Tensor
    """[size] int64."""
    block_tables: torch.Tensor
    """[size, W] int64: W = the most blocks any row holds (a CUDA graph's: max_blocks_per_seq)."""
    context_lens: torch.Tensor
    """[size] int64: KV entries each query reads, its own included."""


class MixedBatch(NamedTuple):
    """A step with prefill chunks: flat tokens (decodes first) and the prefill spans."""

    input_ids: torch.Tensor
    """[T] int64."""
    positions: torch.Tensor
    """[T] int64."""
    slot_mapping: torch.Tensor
    """[T] int64."""
    block_tables: torch.Tensor
    """[num decode rows, W] int64."""
    context_lens: torch.Tensor
    """[num decode rows] int64."""
    spans: list[PrefillSpan]


class DecodeLayout(NamedTuple):
    """Where a decode step's integers sit in its one flat int64 buffer (host and device alike):

        | input_ids | positions | slot_mapping | context_lens | block_tables, row by row |
          size        size        size           size           size x width

    The CUDA graphs keep their static inputs in this layout at width max_blocks_per_seq, so that one
    host -> device copy lands a step's inputs where the graph reads them (cuda_graph.py)."""

    size: int
    """Rows, padding included."""
    width: int
    """Block-table entries per row."""

    @property
    def num_elements(self) -> int:
        return self.size * (4 + self.width)

    def views(self, flat: torch.Tensor) -> DecodeBatch:
        """The `DecodeBatch` views of a buffer laid out so (its first `num_elements` entries)."""
        n, flat = self.size, flat[: self.num_elements]
        return DecodeBatch(flat[:n], flat[n : 2 * n], flat[2 * n : 3 * n], flat[4 * n :].view(n, self.width), flat[3 * n : 4 * n])

    @classmethod
    def fit(cls, chunks: list[ScheduledChunk], size: int) -> DecodeLayout:
        """`size` rows as wide as the longest block table of `chunks` (at least 1)."""
        return cls(size, max(max((len(c.kv.block_ids) for c in chunks), default=1), 1))


def _token(token_id: int) -> int:
    return token_id if token_id >= 0 else 0  # pending: filled in on the device


def num_decode_rows(chunks: list[ScheduledChunk]) -> int:
    return sum(c.num_new_tokens for c in chunks)


def fill_decode(
    flat: np.ndarray, layout: DecodeLayout, chunks: list[ScheduledChunk], block_size: int, scratch_block: int
) -> None:
    """Write the decode rows of `chunks` (the input token, then any draft tokens) into `flat` [num_elements]
    laid out as `layout`; rows past them, and table entries past a row's blocks, are padding (id 0,
    position 0, the scratch slot and block, context length 1)."""
    size, width = layout
    assert flat.shape == (layout.num_elements,), f"buffer of {flat.shape}, layout needs {layout.num_elements}"
    ids, pos, slots, lens = (flat[i * size : (i + 1) * size] for i in range(4))
    tables = flat[4 * size :].reshape(size, width)
    ids[:], pos[:], slots[:], lens[:], tables[:] = 0, 0, scratch_block * block_size, 1, scratch_block
    row = 0
    for chunk in chunks:
        seq, kv = chunk.seq, chunk.kv
        p = seq.num_computed_tokens
        c = p - kv.num_dropped_tokens
        blocks = kv.block_ids
        assert len(blocks) <= width, f"a table of {len(blocks)} blocks does not fit a layout {width} wide"
        draft = chunk.draft.tokens if chunk.draft is not None else ()
        for i in range(chunk.num_new_tokens):
            ids[row] = _token(seq.token_ids[p]) if i == 0 else draft[i - 1]
            pos[row] = p + i
            slots[row] = blocks[(c + i) // block_size] * block_size + (c + i) % block_size
            lens[row] = c + i + 1
            tables[row, : len(blocks)] = blocks
            row += 1
    assert row <= size, f"{row} decode rows do not fit a layout of {size}"


def prepare_decode(
    chunks: list[ScheduledChunk], layout: DecodeLayout, block_size: int, scratch_block: int, device: torch.device,
    dest: torch.Tensor | None = None,
) -> DecodeBatch:
    """The decode rows of `chunks`, padded to `layout`, in one host -> device copy: into `dest` [num_elements]
    int64 on `device` when given (a CUDA graph's static inputs), else into a new buffer. -> views of it."""
    return layout.views(send_decode(chunks, layout, block_size, scratch_block, device, dest))


def send_decode(
    chunks: list[ScheduledChunk], layout: DecodeLayout, block_size: int, scratch_block: int, device: torch.device,
    dest: torch.Tensor | None = None,
) -> torch.Tensor:
    """`prepare_decode`'s flat buffer on the device ([num_elements] int64; `dest` when given)."""
    host = pinned_empty(layout.num_elements, torch.int64, device)
    fill_decode(host.numpy(), layout, chunks, block_size, scratch_block)
    return send(host, device) if dest is None else send_into(host, dest)


def spread_decode(flat: torch.Tensor, layout: DecodeLayout, dest: torch.Tensor, wide: DecodeLayout) -> DecodeBatch:
    """Copy a step's inputs laid out as `layout` (its batch's table width) into `dest` laid out as `wide` (the
    same rows, a wider table: a CUDA graph's static inputs): the four vectors in one copy, the tables into
    the first `layout.width` entries of each wide row (entries past them keep what they held: a row reads
    no more of its table than its context covers). -> `wide`'s views of dest."""
    n = layout.size
    if wide.size != n or wide.width < layout.width:
        raise ValueError(f"a {n}-row layout {layout.width} wide does not spread into {wide.size} rows {wide.width} wide")
    dest[: 4 * n].copy_(flat[: 4 * n])
    views = wide.views(dest)
    views.block_tables[:, : layout.width].copy_(layout.views(flat).block_tables)
    return views


def prepare_mixed(
    decodes: list[ScheduledChunk], prefills: list[ScheduledChunk], block_size: int, device: torch.device,
    sparse_min_len: int | None,
) -> MixedBatch:
    """Flat inputs of a step with prefill chunks. `sparse_min_len`: chunks of at least this many new
    tokens are marked for the sparse prefill (None: sparse prefill off)."""
    num_rows = num_decode_rows(decodes)
    dec = prepare_decode(decodes, DecodeLayout.fit(decodes, num_rows), block_size, 0, device) if decodes else None
    ids, pos, slots, spans = [], [], [], []
    row = num_rows
    for chunk in prefills:
        seq, kv = chunk.seq, chunk.kv
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_new_tokens
        positions = np.arange(start, end, dtype=np.int64)
        c = positions - kv.num_dropped_tokens
        table = np.asarray(kv.block_ids, dtype=np.int64)
        ids.append(np.asarray(seq.token_ids[start:end], dtype=np.int64))
        pos.append(positions)
        slots.append(table[c // block_size] * block_size + c % block_size)
        kv_end = kv.kv_len(end)
        sparse = sparse_min_len is not None and end - start >= sparse_min_len
        spans.append(PrefillSpan(row, end - start, kv_end, kv.block_ids[: -(-kv_end // block_size)], sparse))
        row += end - start
    num_prefill = row - num_rows
    host = pinned_empty(3 * num_prefill, torch.int64, device)
    arr = host.numpy()
    arr[:num_prefill] = np.concatenate(ids)
    arr[num_prefill : 2 * num_prefill] = np.concatenate(pos)
    arr[2 * num_prefill :] = np.concatenate(slots)
    flat = send(host, device)
    p_ids, p_pos, p_slots = flat[:num_prefill], flat[num_prefill : 2 * num_prefill], flat[2 * num_prefill :]
    if dec is None:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return MixedBatch(p_ids, p_pos, p_slots, empty.view(0, 1), empty, spans)
    return MixedBatch(
        torch.cat((dec.input_ids, p_ids)), torch.cat((dec.positions, p_pos)), torch.cat((dec.slot_mapping, p_slots)),
        dec.block_tables, dec.context_lens, spans,
    )
