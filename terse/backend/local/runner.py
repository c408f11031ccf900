"""The model runner: turns a `StepPlan` into tensors, runs the model, samples and scores.

Flat layout of one step (see attention.py): decode tokens first, then prefill chunks. Per token the
runner provides its id, its position in its sequence and its KV slot:

    slot(p) = block_table[c // block_size] * block_size + c % block_size,  c = p - num_dropped_tokens

(c = p for the dense cache; a streaming sequence's table skips its released blocks, see streaming.py).
The RoPE position of a token stays p.

Only rows that need logits go through the lm_head: the last token of a chunk that completes its
sequence (it samples the next token), and every scored position of a scoring request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from terse.backend.attention_kernels import no_cudnn_attention
from terse.backend.local.attention import AttentionMetadata, PrefillSpan, build_prefill_groups
from terse.backend.local.cuda_graph import DecodeGraphs
from terse.backend.local.grammar import GrammarMasks, PendingMasks
from terse.backend.local.kv_cache import KVCachePool
from terse.backend.local.models.llama import LlamaForCausalLM, rope_inv_freq
from terse.backend.local.scheduler import StepPlan
from terse.backend.local.sequence import Sequence
from terse.backend.local.sparse_prefill import SparsePrefill
from terse.backend.local.streaming import apply_sink_rotation
from terse.backend.sampling import sample_next, sampled_logprobs
from terse.backend.types import TokenLogprob


@dataclass
class StepOutput:
    sampled: list[tuple[Sequence, int]] = field(default_factory=list)
    """(sequence, next token id) for each sequence whose chunk reached its last token."""
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """Parallel to `sampled`: the token's log-probabilities when its request asked for them, else None."""


class ModelRunner:
    """Executes plans on one device. Mutates the KV pool and scoring sequences' `prompt_logprobs`."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        pool: KVCachePool,
        *,
        device: torch.device,
        max_model_len: int,
        prefill_path: str = "dense",
        use_triton_decode: bool = False,
        sparse_prefill: SparsePrefill | None = None,
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = device
        self.block_size = pool.block_size
        self.max_blocks_per_seq = -(-max_model_len // pool.block_size)
        self.prefill_path = prefill_path
        self.use_triton_decode = use_triton_decode
        self.graphs: DecodeGraphs | None = None
        self.sparse_prefill = sparse_prefill
        self.grammar_masks = GrammarMasks(model.config.vocab_size, device)

    def capture_cuda_graphs(self, max_batch_size: int) -> None:
        self.graphs = DecodeGraphs(self, max_batch_size)

    def release(self) -> None:
        """Drop the captured graphs and their static buffers (the engine is closing)."""
        self.graphs = None

    def _tensor(self, values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table, dropped = self.block_size, seq.block_table, seq.num_dropped_tokens
        return [table[c // bs] * bs + c % bs for c in range(start - dropped, end - dropped)]

    def padded_tables(self, seqs: list[Sequence], num_blocks: int) -> torch.Tensor:
        """[len(seqs), num_blocks] block tables padded with the scratch block."""
        rows = [s.block_table + [self.pool.scratch_block] * (num_blocks - len(s.block_table)) for s in seqs]
        if not rows:
            return torch.zeros(0, num_blocks, dtype=torch.int64, device=self.device)
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        if plan.sink_rotations:
            inv_freq = rope_inv_freq(self.model.config)
            for rotation in plan.sink_rotations:
                apply_sink_rotation(self.pool.kv, rotation, inv_freq)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[tuple[int, Sequence]] = []
        score_rows: list[tuple[int, Sequence, int]] = []  # (flat row, seq, target token id)
        spans: list[PrefillSpan] = []
        decode_seqs = [c.seq for c in plan.decodes]
        tagged = [(False, c) for c in plan.decodes] + [(True, c) for c in plan.prefills]
        for is_prefill, chunk in tagged:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_new_tokens
            row0 = len(input_ids)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += self._slots(seq, start, end)
            if is_prefill:
                kv_end = end - seq.num_dropped_tokens
                sparse = self.sparse_prefill is not None and self.sparse_prefill.is_sparse(end - start)
                table = seq.block_table[: -(-kv_end // self.block_size)]
                spans.append(PrefillSpan(row0, end - start, kv_end, table, sparse))
            if seq.num_logprob_start is not None:
                for p in range(max(start, seq.num_logprob_start), min(end, seq.num_tokens - 1)):
                    score_rows.append((row0 + p - start, seq, seq.token_ids[p + 1]))
            elif end == seq.num_tokens:
                sample_rows.append((row0 + end - start - 1, seq))
        masks = self.grammar_masks.begin([s for _, s in sample_rows])  # structured output: overlaps the forward
        if not plan.prefills and self.graphs is not None and self.graphs.fits(len(decode_seqs)):
            hidden = self.graphs.run(decode_seqs, input_ids, positions, slots)
        else:
            max_blocks = max((len(s.block_table) for s in decode_seqs), default=1)
            cfg = self.model.config
            groups = build_prefill_groups(
                spans, block_size=self.block_size, num_q_per_kv=cfg.num_heads // cfg.num_kv_heads, device=self.device
            )
            meta = AttentionMetadata(
                slot_mapping=self._tensor(slots),
                num_decode_tokens=len(decode_seqs),
                decode_block_tables=self.padded_tables(decode_seqs, max_blocks),
                decode_context_lens=self._tensor([s.num_kv_tokens + 1 for s in decode_seqs], torch.int32),
                prefills=spans,
                prefill_groups=groups,
                prefill_path=self.prefill_path,
                use_triton_decode=self.use_triton_decode,
                sparse_prefill=self.sparse_prefill if any(s.sparse for s in spans) else None,
            )
            with no_cudnn_attention(self.device):
                hidden = self.model(self._tensor(input_ids), self._tensor(positions), self.pool, meta)  # [T, hidden]
        self._score(hidden, score_rows)
        return self._sample(hidden, sample_rows, masks)

    def _sample(
        self, hidden: torch.Tensor, rows: list[tuple[int, Sequence]], masks: PendingMasks | None = None
    ) -> StepOutput:
        if not rows:
            return StepOutput()
        logits = self.model.compute_logits(hidden[self._tensor([r for r, _ in rows])])  # [N, V]
        if masks is not None:
            masks.apply(logits)  # grammar masks on the constrained rows only
        seqs = [s for _, s in rows]
        params = [s.params for s in seqs]
        next_ids = sample_next(logits, params, [s.generator for s in seqs])  # [N]
        return StepOutput(list(zip(seqs, next_ids.tolist())), sampled_logprobs(logits, next_ids, params))

    def _score(self, hidden: torch.Tensor, rows: list[tuple[int, Sequence, int]]) -> None:
        if not rows:
            return
        logits = self.model.compute_logits(hidden[self._tensor([r for r, _, _ in rows])])  # [N, V]
        targets = self._tensor([t for _, _, t in rows])
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0].tolist()
        for (_, seq, _), lp in zip(rows, logprobs):
            seq.prompt_logprobs.append(lp)
