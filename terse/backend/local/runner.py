"""The model runner: launches a `StepPlan` on the device and hands back a `StepHandle`.

`launch` never waits for the device: it builds the step's inputs (inputs.py), runs the forward (a
captured CUDA graph for decode steps that fit one, else eagerly), computes the logits of the rows that
sample or score, samples on the device, and starts copying the results to pinned host memory. The
engine collects them with `StepHandle.wait()` while the next step already runs. A decode input sampled
by the step just before (still `PENDING_TOKEN` on the host) is copied from that step's sampled ids on
the device.

Only rows that need logits go through the lm_head: the last token of a chunk that completes its
sequence (it samples the next token), and every scored position of a scoring request. Sampling has one
call site, `_sample`, outside any captured graph: per-sequence logit masks belong there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from terse.backend.attention_kernels import no_cudnn_attention
from terse.backend.local.attention import AttentionBackend
from terse.backend.local.cuda_graph import DecodeGraphs
from terse.backend.local.inputs import DecodeBatch, prepare_decode, prepare_mixed
from terse.backend.local.kv_cache import KVCachePool
from terse.backend.local.models.llama import LlamaForCausalLM, rope_inv_freq
from terse.backend.local.scheduler import ScheduledChunk, StepPlan
from terse.backend.local.sequence import PENDING_TOKEN, Sequence
from terse.backend.local.staging import to_device
from terse.backend.sampling import sample_next


@dataclass
class StepOutput:
    """Host-side results of one step."""

    sampled: list[tuple[Sequence, int]] = field(default_factory=list)
    """(sequence, next token id) for each sequence whose chunk reached its last token."""
    scores: list[tuple[Sequence, float]] = field(default_factory=list)
    """(scoring sequence, log-probability) per scored position, in position order."""


class StepHandle:
    """A launched step: its plan and its results on their way to the host."""

    def __init__(
        self, plan: StepPlan, sampled: list[Sequence], sampled_ids: torch.Tensor | None,
        scored: list[Sequence], logprobs: torch.Tensor | None, completed: list[Sequence],
    ) -> None:
        self.plan = plan
        self.sampled_seqs = sampled
        self.scored_seqs = scored
        self.completed_seqs = completed
        """Sequences that sample nothing (scoring, prefill-only) whose last token this step computes."""
        self.preemptions_at_launch = {seq.seq_id: seq.num_preemptions for seq in scored + completed}
        """Results of a sequence preempted after the launch are dropped (its recompute runs again)."""
        self._ids = _to_host(sampled_ids)
        self._logprobs = _to_host(logprobs)
        self._event: torch.cuda.Event | None = None
        device = sampled_ids.device if sampled_ids is not None else logprobs.device if logprobs is not None else None
        if device is not None and device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> StepOutput:
        """Block until the step's results are on the host."""
        if self._event is not None:
            self._event.synchronize()
        ids = self._ids.tolist() if self._ids is not None else []
        logprobs = self._logprobs.tolist() if self._logprobs is not None else []
        return StepOutput(list(zip(self.sampled_seqs, ids)), list(zip(self.scored_seqs, logprobs)))


def _to_host(values: torch.Tensor | None) -> torch.Tensor | None:
    if values is None or values.device.type != "cuda":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host


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
        self._inv_freq = rope_inv_freq(model.config)
        self._last_ids: torch.Tensor | None = None  # [N] ids sampled by the latest launched step
        self._last_rows: dict[int, int] = {}  # seq_id -> its row in _last_ids

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
        """Queue the step on the device; returns at once (on CPU, once it has run)."""
        for copy in plan.copies:
            self.pool.apply_copy(copy, self._inv_freq)
        if plan.prefills:
            hidden = self._run_mixed(plan)
        else:
            hidden = self._run_decode(plan.decodes)
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        score_rows: list[int] = []
        targets: list[int] = []
        scored: list[Sequence] = []
        completed: list[Sequence] = []
        row = 0
        for chunk in plan.chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_new_tokens
            if seq.num_logprob_start is not None:
                for p in range(max(start, seq.num_logprob_start), min(end, seq.num_tokens - 1)):
                    score_rows.append(row + p - start)
                    targets.append(seq.token_ids[p + 1])
                    scored.append(seq)
            if end == seq.num_tokens and seq.samples:
                sample_rows.append(row + end - start - 1)
                sampled.append(seq)
            elif end == seq.num_tokens:
                completed.append(seq)
            row += chunk.num_new_tokens
        self._last_rows = {}
        next_ids = self._sample(self._rows(hidden, sample_rows), sampled) if sampled else None
        if next_ids is not None:
            self._last_ids = next_ids
            self._last_rows = {seq.seq_id: i for i, seq in enumerate(sampled)}
        logprobs = self._score(self._rows(hidden, score_rows), targets) if scored else None
        return StepHandle(plan, sampled, next_ids, scored, logprobs, completed)

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

    # -- outputs ---------------------------------------------------------------------------------
    def _rows(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if rows == list(range(len(rows))):
            return hidden[: len(rows)]
        return hidden.index_select(0, to_device(rows, torch.int64, self.device))

    def _sample(self, hidden: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The one sampling call site: hidden [N, hidden] of the sampling rows -> next ids [N] (device)."""
        logits = self.model.logits(hidden)  # [N, V], model dtype
        return sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs])

    def _score(self, hidden: torch.Tensor, targets: list[int]) -> torch.Tensor:
        """log P(target) per scored row: [M] float32 (device)."""
        logits = self.model.compute_logits(hidden)  # [M, V]
        index = to_device(targets, torch.int64, self.device)
        return torch.log_softmax(logits, dim=-1).gather(-1, index[:, None])[:, 0]
