"""The scheduler: which sequences compute how many tokens in the next step. It budgets and orders;
KV memory is the KV manager's (kv_manager.py). Pure Python over ids and lengths; the runner executes
its `StepPlan`.

Each step has a token budget (`max_num_batched_tokens`) and runs in two visible phases:

1. decode phase: every running sequence with exactly one uncomputed token gets it (1 token each);
2. prefill phase: running sequences mid-prefill continue with their next chunk, then waiting sequences
   are admitted (their cached prefix skipped) while budget, sequence slots and blocks last.

Chunked prefill (budget 8, block size 4, a 13-token prompt admitted into an idle engine):

    step 1: tokens 0..7   (8 of budget 8)       step 2: tokens 8..12 (5) + other work (3)

The waiting queue is ordered by a read-only prefix-cache lookup (preempted sequences first, then the
longest cached prefix first); only an admitted sequence commits its match. When a running sequence
needs a block and none is free (after evicting unpinned prefix-cache leaves), the most recently
admitted running sequence not yet scheduled this step is preempted by recomputation: the KV manager
frees it (its computed full blocks stay in the prefix cache) and it returns to the front of the waiting
queue. Admissions never preempt.

Steps overlap with the host (engine.py): a sequence may be scheduled while the token it decodes is
still on the device. A sequence whose pending token already reaches its length limit is not scheduled,
and a waiting sequence with a pending token waits until it arrives.

Speculative decoding (speculative.py): a decoding sequence with a draft computes 1 + len(draft) rows,
the draft shortened to the step's budget. With held drafting, a sequence that drafts in its next step
waits while its last token is on the device (`hold_drafting`); all others decode every step. Its KV
slots reach `num_speculative_tokens` further than its computed count says (the step in flight may
accept that many draft tokens). A draft never preempts anyone: when its blocks are not there, the
sequence decodes one token instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from terse.backend.local.kv_manager import KVManager
from terse.backend.local.kv_policy import KVCopy, SeqKV
from terse.backend.local.sequence import Draft, Sequence, SequenceStatus


class ScheduledChunk(NamedTuple):
    seq: Sequence
    num_new_tokens: int
    """Tokens computed this step, starting at `seq.num_computed_tokens`."""
    kv: SeqKV
    """Where the sequence's KV lives (read-only for the runner)."""
    draft: Draft | None = None
    """Decode chunks: the draft verified after the input token (num_new_tokens = 1 + len(draft.tokens))."""

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft.tokens) if self.draft is not None else 0


@dataclass
class StepPlan:
    """What the runner computes in one step. Decodes come first in the flat batch."""

    decodes: list[ScheduledChunk] = field(default_factory=list)
    """One-token decodes first, then the decodes that verify a draft."""
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    copies: list[KVCopy] = field(default_factory=list)
    """KV block copies the runner applies before the step (streaming sink rewrites)."""

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Owns the waiting queue and the running list; asks `kv` for memory."""

    def __init__(
        self, kv: KVManager, *, max_num_seqs: int, max_num_batched_tokens: int, hold_drafting: bool = False
    ) -> None:
        self.kv = kv
        self.hold_drafting = hold_drafting
        """Held drafting (`SpeculativeSettings.draft_ahead` False): a sequence whose next step drafts
        (`SpecState.drafting`, set by the speculator's proposal just before scheduling) waits while its
        last token is on the device, so that its draft is built from known tokens. A sequence that does
        not draft (no match, or backing off) is never held: it decodes every step, without a draft."""
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queue management ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, cancelled or failed) from the queues and free its KV."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    # -- planning --------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        # Phase 1: decode. One token per running sequence whose prompt is fully computed, plus its draft.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.is_prefilling or not self._may_decode(seq):
                continue
            if self.hold_drafting and seq.num_pending_tokens and seq.spec is not None and seq.spec.drafting:
                continue
            draft = self._fit_draft(seq, budget)
            reach = seq.num_speculative_tokens  # the step in flight may accept this many draft tokens
            if self._reserve(seq, reach + 1, scheduled, plan):
                num_new = 1 + (len(draft.tokens) if draft is not None else 0)
                plan.decodes.append(ScheduledChunk(seq, num_new, self.kv.table(seq), draft))
                scheduled.add(seq.seq_id)
                budget -= num_new
        plan.decodes.sort(key=lambda c: c.draft is not None)  # stable: one-token rows first
        # Phase 2a: prefill, running sequences continue their chunked prefill.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or not seq.is_prefilling:
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, num_new, scheduled, plan):
                plan.prefills.append(ScheduledChunk(seq, num_new, self.kv.table(seq)))
                scheduled.add(seq.seq_id)
                budget -= num_new
        # Phase 2b: prefill, admit waiting sequences.
        self._admit(plan, budget, scheduled)
        plan.copies = self.kv.take_pending_copies()
        return plan

    def _fit_draft(self, seq: Sequence, budget: int) -> Draft | None:
        """The sequence's draft cut to the budget, if its KV slots can be had without evicting anyone
        running (else None)."""
        draft = seq.draft
        if draft is None or budget < 2:
            return None
        if len(draft.tokens) > budget - 1:
            draft = draft._replace(tokens=draft.tokens[: budget - 1])
        if not self.kv.allocate(seq, seq.num_speculative_tokens + 1 + len(draft.tokens)):
            return None
        return draft

    @staticmethod
    def _may_decode(seq: Sequence) -> bool:
        """False while the token it would compute ends it anyway."""
        if seq.num_pending_tokens and seq.reached_length_limit:
            return False
        return seq.num_uncomputed_tokens == 1

    def _admit(self, plan: StepPlan, budget: int, scheduled: set[int]) -> None:
        if budget == 0 or len(self.running) >= self.max_num_seqs or not self.waiting:
            return  # skip ordering the queue (a prefix lookup per request) when nobody can enter
        prefilling = [s for s in self.running if s.is_prefilling]
        for seq in self._admission_order():
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.num_pending_tokens:
                continue  # its prefill needs the token's value on the host
            lookup = self.kv.lookup(seq)  # fresh: earlier admissions may have evicted
            if self._should_wait_for_sibling(seq, lookup.num_tokens, prefilling):
                continue
            num_new = min(seq.num_tokens - lookup.num_tokens, budget)
            if not self.kv.allocate(seq, num_new, lookup):
                break
            seq.num_computed_tokens = seq.num_cached_tokens = lookup.num_tokens
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.is_prefilling:
                prefilling.append(seq)
            plan.prefills.append(ScheduledChunk(seq, num_new, self.kv.table(seq)))
            scheduled.add(seq.seq_id)
            budget -= num_new

    def _admission_order(self) -> list[Sequence]:
        """Preempted sequences first (in queue order); then the longest cached prefix first (ties in
        arrival order). The lookups are read-only: nothing changes for sequences not admitted."""
        queue = list(self.waiting)
        if self.kv.prefix_cache is None:
            return queue
        preempted = [s for s in queue if s.num_preemptions]
        fresh = [s for s in queue if not s.num_preemptions]
        fresh.sort(key=lambda s: -self.kv.lookup(s).num_tokens)
        return preempted + fresh

    def _should_wait_for_sibling(self, seq: Sequence, num_cached: int, prefilling: list[Sequence]) -> bool:
        """True when a running sequence (of `prefilling`) is about to compute more of this one's prefix
        than the cache holds: waiting a step or two lets this one reuse those blocks instead."""
        if self.kv.prefix_cache is None:
            return False
        bs = self.kv.block_size
        start = num_cached
        if start + bs > seq.max_cacheable_prefix_len:
            return False
        next_block = seq.token_ids[start : start + bs]
        for other in prefilling:
            # `other` has not computed that block yet (computed blocks are already in the cache).
            if other.num_computed_tokens < start + bs and other.token_ids[start : start + bs] == next_block:
                return True
        return False

    def _reserve(self, seq: Sequence, num_new: int, scheduled: set[int], plan: StepPlan) -> bool:
        """KV slots for `num_new` more tokens of `seq`, preempting later-admitted unscheduled sequences
        if blocks run out. False when `seq` itself had to be preempted."""
        while not self.kv.allocate(seq, num_new):
            victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        self.num_preemptions += 1

    # -- after launching the step ----------------------------------------------------------------
    def on_step_launched(self, plan: StepPlan) -> None:
        """Advance the computed counters (the device computes the step in order, before any later
        step reads its KV); publish newly completed prompt blocks to the prefix cache so sibling
        requests can share them while this one is still running."""
        bs = self.kv.block_size
        for chunk in plan.chunks:
            seq = chunk.seq
            before = seq.num_computed_tokens
            seq.num_computed_tokens += chunk.num_new_tokens - chunk.num_draft_tokens  # drafts count once accepted
            if (
                seq.status is SequenceStatus.RUNNING
                and before < seq.num_prompt_tokens
                and seq.num_computed_tokens // bs > before // bs
            ):
                self.kv.cache_computed(seq)
