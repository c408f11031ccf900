"""The model runner: launches a `StepPlan` on the device and hands back a `StepHandle` (step.py).

`launch` never waits for the device: it builds the step's inputs (inputs.py), runs the forward (a
captured CUDA graph for decode steps that fit one, else eagerly), computes the logits of the rows that
sample or score, samples on the device, and starts copying the results to pinned host memory. The
engine collects them with `StepHandle.wait()` while the next step already runs. A decode input sampled
by the step just before (still `PENDING_TOKEN` on the host) is copied from that step's sampled ids on
the device.

Only rows that need logits go through the lm_head: the last token of a chunk that completes its
sequence (it samples the next token), and every scored position of a scoring request. Sampling runs
outside any captured graph, in two places:

    launch        free rows (no grammar): sampled at once; log-probabilities on the device for the
                  rows that ask, nothing read back
    sample_late   constrained rows: their grammar mask needs the token sampled by the step before,
                  which reaches the host only after this step was launched. The engine calls it once
                  that token advanced the grammar; it masks (local/grammar.py), samples, writes the
                  ids into the step's sampled ids and seals the handle, before the next launch.

So a constrained sequence decodes in every step, like a free one, and a step without constraints does
exactly what it did without this hook.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from terse.backend.attention_kernels import no_cudnn_attention
from terse.backend.local.attention import AttentionBackend
from terse.backend.local.cuda_graph import DecodeGraphs
from terse.backend.local.grammar import GrammarMasks
from terse.backend.local.inputs import DecodeBatch, prepare_decode, prepare_mixed
from terse.backend.local.kv_cache import KVCachePool
from terse.backend.local.models.llama import LlamaForCausalLM, rope_inv_freq
from terse.backend.local.scheduler import ScheduledChunk, StepPlan
from terse.backend.local.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from terse.backend.local.staging import to_device
from terse.backend.local.step import LateRows, StepHandle, StepOutput
from terse.backend.sampling import LogprobRows, logprob_rows, sample_next

__all__ = ["ModelRunner", "StepHandle", "StepOutput"]


class _Rows(NamedTuple):
    """Which rows of a step's flat batch need logits, and why."""

    sample: list[tuple[int, Sequence]]
    """(row, sequence) of each chunk that completes its sequence and samples its next token."""
    score: list[tuple[int, Sequence, int]]
    """(row, scoring sequence, target token) per scored position, in position order."""
    completed: list[Sequence]
    """Sequences that sample nothing (scoring, prefill-only) whose last token this step computes."""


def _step_rows(plan: StepPlan) -> _Rows:
    rows = _Rows([], [], [])
    row = 0
    for chunk in plan.chunks:
        seq, start = chunk.seq, chunk.seq.num_computed_tokens
        end = start + chunk.num_new_tokens
        if seq.num_logprob_start is not None:
            for p in range(max(start, seq.num_logprob_start), min(end, seq.num_tokens - 1)):
                rows.score.append((row + p - start, seq, seq.token_ids[p + 1]))
        if end == seq.num_tokens and seq.samples:
            rows.sample.append((row + end - start - 1, seq))
        elif end == seq.num_tokens:
            rows.completed.append(seq)
        row += chunk.num_new_tokens
    return rows


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
        self._last_ids: torch.Tensor | None = None  # [N] ids sampled by the latest launched step
        self._last_rows: dict[int, int] = {}  # seq_id -> its row in _last_ids
        self.num_device_inputs = 0
        """Decode inputs copied on the device from the step before (launched before it was collected)."""
        self.num_late_samples = 0
        """Constrained rows sampled by `sample_late`."""

    def capture_cuda_graphs(self, max_batch_size: int) -> None:
        self.graphs = DecodeGraphs(
            self._forward_decode, max_batch_size=max_batch_size, max_blocks_per_seq=self.max_blocks_per_seq,
            scratch_block=self.pool.scratch_block, block_size=self.block_size, device=self.device,
        )

    def release(self) -> None:
        """Drop the captured graphs and their static buffers (the engine is closing)."""
        self.graphs = None
        self._last_ids = None

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> StepHandle:
        """Queue the step on the device; returns at once (on CPU, once it has run). A step with
        constrained rows returns an unsealed handle: call `sample_late` before the next launch."""
        for copy in plan.copies:
            self.pool.apply_copy(copy, self._inv_freq)
        hidden = self._run_mixed(plan) if plan.prefills else self._run_decode(plan.decodes)  # [T, hidden]
        rows = _step_rows(plan)
        free = [(r, s) for r, s in rows.sample if s.constraint is None]
        late = [(r, s) for r, s in rows.sample if s.constraint is not None]
        sampled = [s for _, s in free] + [s for _, s in late]
        free_ids: torch.Tensor | None = None
        logprobs: LogprobRows | None = None
        if free:
            free_seqs = [s for _, s in free]
            logits = self.model.logits(self._rows(hidden, [r for r, _ in free]))  # [F, V]
            free_ids = sample_next(logits, [s.params for s in free_seqs], [s.generator for s in free_seqs])  # [F]
            logprobs = self._logprobs(logits, free_ids, free_seqs, list(range(len(free))))
        next_ids = free_ids
        late_rows = None
        if late:  # the late rows' ids are written by sample_late, after the free ones
            next_ids = torch.zeros(len(sampled), dtype=torch.int64, device=self.device)
            if free_ids is not None:
                next_ids[: len(free)] = free_ids
            late_rows = LateRows([s for _, s in late], self._rows(hidden, [r for r, _ in late]), len(free))
        self._last_ids = next_ids
        self._last_rows = {seq.seq_id: i for i, seq in enumerate(sampled)}
        scores = self._score(hidden, rows.score) if rows.score else None
        handle = StepHandle(plan, sampled, next_ids, [s for _, s, _ in rows.score], scores, rows.completed, late_rows)
        if logprobs is not None:
            handle.add_logprobs(logprobs)
        if late_rows is None:
            handle.seal()
        return handle

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
    def _run_decode(self, decodes: list[ScheduledChunk]) -> torch.Tensor:
        graphs = self.graphs
        size = graphs.padded_size(len(decodes)) if graphs is not None else None
        batch = prepare_decode(decodes, size or len(decodes), self.block_size, self.pool.scratch_block, self.device)
        self._fill_pending(batch.input_ids, decodes)
        if graphs is not None and size is not None:
            return graphs.run(batch)
        return self._forward_decode(batch)

    def _forward_decode(self, batch: DecodeBatch) -> torch.Tensor:
        """The decode forward (eager, and the function the CUDA graphs capture). -> [size, hidden]."""
        plan = self.attention.plan(batch.slot_mapping, batch.block_tables, batch.context_lens)
        return self.model(batch.input_ids, batch.positions, self.pool, plan)

    def _run_mixed(self, plan: StepPlan) -> torch.Tensor:
        sparse = self.attention.sparse_prefill
        batch = prepare_mixed(
            plan.decodes, plan.prefills, self.block_size, self.device,
            sparse.config.min_sparse_q_len if sparse is not None else None,
        )
        self._fill_pending(batch.input_ids, plan.decodes)
        attn = self.attention.plan(batch.slot_mapping, batch.block_tables, batch.context_lens, batch.spans)
        with no_cudnn_attention(self.device):
            return self.model(batch.input_ids, batch.positions, self.pool, attn)  # [T, hidden]

    def _fill_pending(self, input_ids: torch.Tensor, decodes: list[ScheduledChunk]) -> None:
        """Copy decode inputs still on the device (sampled by the previous step) into `input_ids`."""
        rows, src = [], []
        for i, chunk in enumerate(decodes):
            seq = chunk.seq
            if seq.token_ids[seq.num_computed_tokens] == PENDING_TOKEN:
                rows.append(i)
                src.append(self._last_rows[seq.seq_id])
        if not rows:
            return
        assert self._last_ids is not None
        index = to_device(rows + src, torch.int64, self.device)
        input_ids.index_copy_(0, index[: len(rows)], self._last_ids.index_select(0, index[len(rows) :]))
        self.num_device_inputs += len(rows)

    # -- outputs ---------------------------------------------------------------------------------
    def _rows(self, values: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if rows == list(range(len(rows))):
            return values[: len(rows)]
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
