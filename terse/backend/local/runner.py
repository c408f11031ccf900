"""The model runner: launches a `StepPlan` on the device and hands back a `StepHandle` (step.py).

`launch` never waits for the device: it builds the step's inputs (inputs.py), runs the forward (a
captured CUDA graph for decode steps that fit one, else eagerly), computes the logits of the rows that
sample or score, samples on the device, and starts copying the results to pinned host memory. The
engine collects them with `StepHandle.wait()` while the next step already runs. A decode input sampled
by the step just before (still `PENDING_TOKEN` on the host) is copied from that step's sampled ids on
the device.

Only rows that need logits go through the lm_head: the last token of a chunk that completes its
sequence (it samples the next token), and every scored position of a scoring request. A decode graph of
up to `cuda_graph.HEAD_MAX_SIZE` rows runs the lm_head on all its rows inside the replay; its logits are
taken when every row samples (batch 1, say), else the sampling rows go through the lm_head again (see
`_sampling_logits`). Sampling runs
outside any captured graph, in two places:

    launch        free rows (no grammar): sampled at once; log-probabilities on the device for the
                  rows that ask, nothing read back
    sample_late   constrained rows: their grammar mask needs the token sampled by the step before,
                  which reaches the host only after this step was launched. The engine calls it once
                  that token advanced the grammar; it masks (local/grammar.py), samples, writes the
                  ids into the step's sampled ids and seals the handle, before the next launch.

So a constrained sequence decodes in every step, like a free one, and a step without constraints does
exactly what it did without this hook.

Speculative decoding: a sequence verifying a draft has a logit row per input and draft token; the free
rows of a step with any draft go through `verify` (verify.py) instead of `sample_next`, which yields per
sequence its accepted draft tokens and one more. What the next step needs from this one (input tokens,
accepted counts for shifting positions, gates) stays on the device (carry.py). A step without drafts
does exactly what it did before.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from terse.backend.attention_kernels import no_cudnn_attention
from terse.backend.local.attention import AttentionBackend
from terse.backend.local.carry import NO_GATES, DecodeRows, Gates, StepCarry, take_carry
from terse.backend.local.cuda_graph import DecodeGraphs
from terse.backend.local.grammar import GrammarMasks
from terse.backend.local.inputs import (
    DecodeBatch,
    DecodeLayout,
    num_decode_rows,
    prepare_decode,
    prepare_mixed,
    send_decode,
    spread_decode,
)
from terse.backend.local.kv_cache import KVCachePool
from terse.backend.local.models.llama import LlamaForCausalLM, rope_inv_freq
from terse.backend.local.scheduler import ScheduledChunk, StepPlan
from terse.backend.local.sequence import Draft, Sequence, SequenceStatus
from terse.backend.local.staging import to_device
from terse.backend.local.step import LateRows, StepHandle, StepOutput
from terse.backend.local.verify import VerifyLayout, verify
from terse.backend.sampling import LogprobRows, logprob_rows, sample_next

__all__ = ["ModelRunner", "StepHandle", "StepOutput"]


class _Sample(NamedTuple):
    row: int
    """First row in the flat batch."""
    num_rows: int
    """1, or 1 + len(draft) for a sequence verifying a draft."""
    seq: Sequence
    draft: Draft | None


class _Rows(NamedTuple):
    """Which rows of a step's flat batch need logits, and why."""

    sample: list[_Sample]
    """Each chunk that completes its sequence and samples its next token(s)."""
    score: list[tuple[int, Sequence, int]]
    """(row, scoring sequence, target token) per scored position, in position order."""
    completed: list[Sequence]
    """Sequences that sample nothing (scoring, prefill-only) whose last token this step computes."""


def _step_rows(plan: StepPlan) -> _Rows:
    rows = _Rows([], [], [])
    row = 0
    for chunk in plan.chunks:
        seq, start = chunk.seq, chunk.seq.num_computed_tokens
        end = start + chunk.num_new_tokens - chunk.num_draft_tokens  # draft rows follow the last token
        if seq.num_logprob_start is not None:
            for p in range(max(start, seq.num_logprob_start), min(end, seq.num_tokens - 1)):
                rows.score.append((row + p - start, seq, seq.token_ids[p + 1]))
        if end == seq.num_tokens and seq.samples:
            rows.sample.append(_Sample(row + end - start - 1, 1 + chunk.num_draft_tokens, seq, chunk.draft))
        elif end == seq.num_tokens:
            rows.completed.append(seq)
        row += chunk.num_new_tokens
    return rows


def _decode_rows(decodes: list[ScheduledChunk]) -> list[tuple[int, int]]:
    """(first row, rows) of each decode chunk (one-token decodes first, then those verifying a draft)."""
    out, row = [], 0
    for chunk in decodes:
        out.append((row, chunk.num_new_tokens))
        row += chunk.num_new_tokens
    return out


FULL_WIDTH_COPY_BYTES = 256 << 10
"""A graph step's inputs go straight into the graph's static buffer, block tables at its full width
(max_model_len / block_size), while that layout takes at most this many bytes; beyond (long contexts at
large batches: 32 rows of a 131072-token model are 2.1 MB) they are sent at the batch's own table width
and spread into the static buffer by two device copies."""


class ModelRunner:
    """Executes plans on one device. Mutates the KV pool."""

    def __init__(
        self, model: LlamaForCausalLM, pool: KVCachePool, attention: AttentionBackend, *,
        device: torch.device, max_model_len: int,
    ) -> None:
        self.model = model
        self.pool = pool
        self.attention = attention
        self.device = device
        self.block_size = pool.block_size
        self.max_blocks_per_seq = -(-max_model_len // pool.block_size)
        self.graphs: DecodeGraphs | None = None
        self.grammar_masks = GrammarMasks(model.config.vocab_size, device)
        self._inv_freq = rope_inv_freq(model.config)
        self._carry: StepCarry | None = None  # what the latest launched step left for the next one
        self.num_device_inputs = 0
        """Decode inputs copied on the device from the step before (launched before it was collected)."""
        self.num_late_samples = 0
        """Constrained rows sampled by `sample_late`."""

    def capture_cuda_graphs(self, max_batch_size: int, blas: str = "auto") -> None:
        self.graphs = DecodeGraphs(
            self._forward_decode, self.model.logits, max_batch_size=max_batch_size,
            max_blocks_per_seq=self.max_blocks_per_seq, scratch_block=self.pool.scratch_block,
            block_size=self.block_size, device=self.device, blas=blas,
        )

    def release(self) -> None:
        """Drop the captured graphs and their static buffers (the engine is closing)."""
        self.graphs = None
        self._carry = None

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> StepHandle:
        """Queue the step on the device; returns at once (on CPU, once it has run). A step with
        constrained rows returns an unsealed handle: call `sample_late` before the next launch."""
        for copy in plan.copies:
            self.pool.apply_copy(copy, self._inv_freq)
        if plan.prefills:
            (hidden, gates), graph_logits = self._run_mixed(plan), None  # [T, hidden]
        else:
            hidden, graph_logits, gates = self._run_decode(plan.decodes)
        rows = _step_rows(plan)
        free = [x for x in rows.sample if x.seq.constraint is None]
        late = [x for x in rows.sample if x.seq.constraint is not None]
        sampled = [x.seq for x in free] + [x.seq for x in late]
        first_rows = list(itertools.accumulate((x.num_rows for x in free), initial=0))
        num_free_rows = first_rows.pop()
        first_rows += range(num_free_rows, num_free_rows + len(late))
        free_ids: torch.Tensor | None = None
        accepted: torch.Tensor | None = None
        last_rows: torch.Tensor | None = None
        logprobs: LogprobRows | None = None
        if free:
            row_seqs = [x.seq for x in free for _ in range(x.num_rows)]
            logits = self._sampling_logits(hidden, graph_logits, [x.row + i for x in free for i in range(x.num_rows)])  # [Rf, V]
            if num_free_rows > len(free):  # some sequence verifies a draft
                layout = VerifyLayout.build([x.draft.tokens if x.draft is not None else () for x in free])
                seqs = [x.seq for x in free]
                checked = verify(logits, layout, [s.params for s in seqs], [s.generator for s in seqs], self._gate(gates, seqs))
                free_ids, accepted, last_rows = checked.tokens, checked.accepted, checked.last_rows
                if late:
                    accepted = torch.cat((accepted, accepted.new_zeros(len(late))))
                    last_rows = torch.cat((last_rows, to_device(first_rows[len(free) :], torch.int64, self.device)))
            else:
                free_ids = sample_next(logits, [s.params for s in row_seqs], [s.generator for s in row_seqs])  # [F]
            logprobs = self._logprobs(logits, free_ids, row_seqs, list(range(num_free_rows)))
        next_ids = free_ids
        late_rows = None
        if late:  # the late rows' ids are written by sample_late, after the free ones
            next_ids = torch.zeros(num_free_rows + len(late), dtype=torch.int64, device=self.device)
            if free_ids is not None:
                next_ids[:num_free_rows] = free_ids
            late_rows = LateRows([x.seq for x in late], self._rows(hidden, [x.row for x in late]), num_free_rows)
        index = {seq.seq_id: (i, first_rows[i]) for i, seq in enumerate(sampled)}
        self._carry = StepCarry(next_ids, last_rows, accepted, index) if next_ids is not None else None
        scores = self._score(hidden, rows.score) if rows.score else None
        handle = StepHandle(
            plan, sampled, next_ids, [s for _, s, _ in rows.score], scores, rows.completed, late_rows, first_rows, accepted
        )
        if logprobs is not None:
            handle.add_logprobs(logprobs)
        if late_rows is None:
            handle.seal()
        return handle

    def _gate(self, gates: Gates, seqs: list[Sequence]) -> torch.Tensor | None:
        """[len(seqs)] bool: the device-decided gates of drafts built on a guess, True elsewhere."""
        if gates.values is None:
            return None
        position = {s.seq_id: i for i, s in enumerate(seqs)}
        gate = torch.ones(len(seqs), dtype=torch.bool, device=self.device)
        gate.index_copy_(0, to_device([position[i] for i in gates.seq_ids], torch.int64, self.device), gates.values)
        return gate

    @torch.inference_mode()
    def sample_late(self, handle: StepHandle) -> None:
        """Sample the constrained rows of a launched step and seal it. Call once the tokens of the step
        before have advanced their grammars, and before the next launch. Rows of sequences that ended
        meanwhile are skipped (their tokens are dropped)."""
        late = handle.late
        assert late is not None and handle.sampled_ids is not None, "the step has no constrained rows"
        live = [i for i, s in enumerate(late.seqs) if s.status is not SequenceStatus.FINISHED]
        if live:
            seqs = [late.seqs[i] for i in live]
            masks = self.grammar_masks.begin(seqs)  # filled on a worker while the lm_head runs
            logits = self.model.logits(self._rows(late.hidden, live))  # [L, V]
            if masks is not None:
                masks.apply(logits)
            ids = sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs])  # [L]
            if masks is not None:
                masks.check(ids)  # budget-aware closing (local/grammar.py)
            rows = [late.offset + i for i in live]
            handle.sampled_ids.index_copy_(0, to_device(rows, torch.int64, self.device), ids)
            handle.add_logprobs(self._logprobs(logits, ids, seqs, rows))
            self.num_late_samples += len(live)
        handle.seal()

    # -- forward passes --------------------------------------------------------------------------
    def _run_decode(self, decodes: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor | None, Gates]:
        """-> (hidden [size, hidden], the graph's logits [size, vocab] or None when run eagerly, gates).
        A graph step's inputs land in the graph's static buffer (one copy while its full-width layout is
        small, else at the batch's table width and spread on the device) and the carry fills them there."""
        graphs = self.graphs
        num_rows = num_decode_rows(decodes)
        size = graphs.padded_size(num_rows) if graphs is not None else None
        scratch = self.pool.scratch_block
        if graphs is None or size is None:
            batch = prepare_decode(decodes, DecodeLayout.fit(decodes, num_rows), self.block_size, scratch, self.device)
            gates = self._take_carry(DecodeRows(*batch), decodes)
            return self._forward_decode(batch, _decode_rows(decodes)), None, gates
        wide = graphs.layout(size)
        if wide.num_elements * 8 <= FULL_WIDTH_COPY_BYTES:
            batch = prepare_decode(decodes, wide, self.block_size, scratch, self.device, dest=graphs.static_inputs(size))
        else:
            layout = DecodeLayout.fit(decodes, size)
            flat = send_decode(decodes, layout, self.block_size, scratch, self.device)
            batch = spread_decode(flat, layout, graphs.static_inputs(size), wide)
        gates = self._take_carry(DecodeRows(*batch), decodes)
        out = graphs.run(size)
        return out.hidden, out.logits, gates

    def _forward_decode(self, batch: DecodeBatch, decode_rows: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """The decode forward (eager, and the function the CUDA graphs capture, which attend every row
        through the decode kernel). -> [size, hidden]."""
        plan = self.attention.plan(batch.slot_mapping, batch.block_tables, batch.context_lens, decode_rows=decode_rows)
        return self.model(batch.input_ids, batch.positions, self.pool, plan)

    def _run_mixed(self, plan: StepPlan) -> tuple[torch.Tensor, Gates]:
        sparse = self.attention.sparse_prefill
        batch = prepare_mixed(
            plan.decodes, plan.prefills, self.block_size, self.device,
            sparse.config.min_sparse_q_len if sparse is not None else None,
        )
        n = num_decode_rows(plan.decodes)
        rows = DecodeRows(batch.input_ids[:n], batch.positions[:n], batch.slot_mapping[:n], batch.block_tables, batch.context_lens)
        gates = self._take_carry(rows, plan.decodes)
        attn = self.attention.plan(
            batch.slot_mapping, batch.block_tables, batch.context_lens, batch.spans, _decode_rows(plan.decodes)
        )
        with no_cudnn_attention(self.device):
            return self.model(batch.input_ids, batch.positions, self.pool, attn), gates  # [T, hidden]

    def _take_carry(self, rows: DecodeRows, decodes: list[ScheduledChunk]) -> Gates:
        """Decode inputs still on the device (sampled by the previous step), shifted positions, gates."""
        if not decodes:
            return NO_GATES
        num_filled, gates = take_carry(rows, decodes, self._carry, self.block_size)
        self.num_device_inputs += num_filled
        return gates

    # -- outputs ---------------------------------------------------------------------------------
    def _sampling_logits(self, hidden: torch.Tensor, graph_logits: torch.Tensor | None, rows: list[int]) -> torch.Tensor:
        """The LM head of `rows` of `hidden` -> [len(rows), V]. A graph step computed it for all its rows
        already: those logits serve only when `rows` are exactly all of them, in order. A product's kernel
        plan depends on its row count (BLAS heuristics, the INT4 plans per row bucket), so a row's logits
        in a product of other rows may differ in the last bits; fewer rows (say 5 of a graph of 8) go
        through the head again, on exactly the rows they always did."""
        if graph_logits is not None and rows == list(range(graph_logits.shape[0])):
            return graph_logits  # a static buffer: everything reading it is queued before the next replay
        return self.model.logits(self._rows(hidden, rows))

    def _rows(self, values: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """values[rows]: all of values itself (so the LM head of a one-row step gets the forward's own
        output and the final norm's row prep with it, `LlamaForCausalLM.logits`), a leading slice a view."""
        if rows == list(range(len(rows))):
            return values if len(rows) == values.shape[0] else values[: len(rows)]
        return values.index_select(0, to_device(rows, torch.int64, self.device))

    def _logprobs(
        self, logits: torch.Tensor, ids: torch.Tensor, seqs: list[Sequence], rows: list[int]
    ) -> LogprobRows | None:
        """Log-probabilities of the sampled `ids` [N] (from `logits` [N, V]) for the sequences that ask,
        left on the device; None when none does. `rows`: each sequence's row in the step's sampled ids."""
        asking = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not asking:
            return None
        num_top = [int(seqs[i].params.logprobs or 0) for i in asking]
        return logprob_rows(self._rows(logits, asking), self._rows(ids, asking), num_top, [rows[i] for i in asking])

    def _score(self, hidden: torch.Tensor, rows: list[tuple[int, Sequence, int]]) -> torch.Tensor:
        """log P(target) per scored row: [M] float32 (device)."""
        logits = self.model.compute_logits(self._rows(hidden, [r for r, _, _ in rows]))  # [M, V]
        index = to_device([t for _, _, t in rows], torch.int64, self.device)
        return torch.log_softmax(logits, dim=-1).gather(-1, index[:, None])[:, 0]
