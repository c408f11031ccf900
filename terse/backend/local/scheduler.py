"""The scheduler: which sequences compute how many tokens in the next step. Pure Python over ids and
lengths; the runner executes its `StepPlan`.

Each step has a token budget (`max_num_batched_tokens`) and runs in two visible phases:

1. decode phase: every running sequence with exactly one uncomputed token gets it (1 token each);
2. prefill phase: running sequences mid-prefill continue with their next chunk, then waiting sequences
   are admitted (their cached prefix skipped) while budget, sequence slots and blocks last.

Chunked prefill (budget 8, block size 4, a 13-token prompt admitted into an idle engine):

    step 1: tokens 0..7   (8 of budget 8)       step 2: tokens 8..12 (5) + other work (3)

When a running sequence needs a block and none is free (after evicting unlocked prefix-cache
leaves), the most recently admitted running sequence not yet scheduled this step is preempted by
recomputation: its blocks are released (its computed full blocks stay in the prefix cache when there
is one) and it returns to the front of the waiting queue. Admissions never preempt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from terse.backend.local.kv_cache import BlockAllocator
from terse.backend.local.kv_policy import KVPolicy
from terse.backend.local.prefix_cache import PrefixCache, RadixNode
from terse.backend.local.sequence import Sequence, SequenceStatus
from terse.backend.local.streaming import SinkRotation, place_new_blocks, release_old_blocks


class ScheduledChunk(NamedTuple):
    seq: Sequence
    num_new_tokens: int
    """Tokens computed this step, starting at `seq.num_computed_tokens`."""


@dataclass
class StepPlan:
    """What the runner computes in one step. Decodes come first in the flat batch."""

    decodes: list[ScheduledChunk] = field(default_factory=list)
    prefills: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    sink_rotations: list[SinkRotation] = field(default_factory=list)
    """Streaming sequences whose sink copies the runner rewrites before the step (see streaming.py)."""

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
    """Owns the waiting queue, the running list, and each running sequence's blocks and cache lock."""

    def __init__(
        self,
        *,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._policies: dict[int, KVPolicy] = {}
        self._locked: dict[int, RadixNode] = {}  # seq_id -> deepest prefix-cache node it pins
        self.num_preemptions = 0
        self.num_admitted_prompt_tokens = 0
        """Prompt tokens of admitted sequences (counted again after a preemption)."""
        self.num_cached_tokens = 0
        """Of those, tokens whose KV came from the prefix cache."""

    # -- queue management ------------------------------------------------------------------------
    def add(self, seq: Sequence, policy: KVPolicy) -> None:
        seq.status = SequenceStatus.WAITING
        self._policies[seq.seq_id] = policy
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, cancelled or failed) from the queues and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._policies.pop(seq.seq_id, None)

    # -- planning --------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        # Phase 1: decode. One token per running sequence whose prompt is fully computed.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.is_prefilling:
                continue
            if self._reserve(seq, 1, scheduled, plan):
                plan.decodes.append(ScheduledChunk(seq, 1))
                scheduled.add(seq.seq_id)
                budget -= 1
        # Phase 2a: prefill, running sequences continue their chunked prefill.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or not seq.is_prefilling:
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, num_new, scheduled, plan):
                plan.prefills.append(ScheduledChunk(seq, num_new))
                scheduled.add(seq.seq_id)
                budget -= num_new
        # Phase 2b: prefill, admit waiting sequences.
        budget = self._admit(plan, budget, scheduled)
        return plan

    def _admit(self, plan: StepPlan, budget: int, scheduled: set[int]) -> int:
        if budget == 0 or len(self.running) >= self.max_num_seqs or not self.waiting:
            return budget  # skip ordering the queue (a prefix match per request) when nobody can enter
        prefilling = [s for s in self.running if s.is_prefilling]
        for seq in self._admission_order():
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            node, cached_blocks = self._match(seq)
            num_cached = len(cached_blocks) * self.block_size
            if self._should_wait_for_sibling(seq, num_cached, prefilling):
                continue
            num_new = min(seq.num_tokens - num_cached, budget)
            if self.prefix_cache is not None and node is not None:
                self.prefix_cache.lock(node)  # before allocating: allocation may evict
            seq.block_table = list(cached_blocks)
            seq.num_computed_tokens = num_cached
            policy = self._policies[seq.seq_id]
            # A long cached prefix may reach past a streaming window: those blocks are never referenced.
            released = release_old_blocks(seq, policy, num_new, self.block_size)
            num_needed = policy.num_blocks_needed(seq, num_new, self.block_size)
            if not self._make_free(num_needed):
                if self.prefix_cache is not None and node is not None:
                    self.prefix_cache.unlock(node)
                seq.block_table, seq.num_computed_tokens, seq.num_dropped_tokens = [], 0, 0
                break
            self.allocator.incref(seq.block_table)
            self._add_blocks(seq, num_needed, bool(released), plan)
            if released and self.prefix_cache is not None and node is not None:
                self.prefix_cache.unlock(node)  # streaming from the start: the tree may evict this path
                node = None
            seq.num_cached_tokens = num_cached
            self.num_admitted_prompt_tokens += seq.num_tokens
            self.num_cached_tokens += num_cached
            if node is not None:
                self._locked[seq.seq_id] = node
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.is_prefilling:
                prefilling.append(seq)
            plan.prefills.append(ScheduledChunk(seq, num_new))
            scheduled.add(seq.seq_id)
            budget -= num_new
        return budget

    def _admission_order(self) -> list[Sequence]:
        """Preempted sequences first (in queue order); then, with a prefix cache, the longest cached
        prefix first (ties in arrival order); without one, arrival order."""
        queue = list(self.waiting)
        if self.prefix_cache is None:
            return queue
        preempted = [s for s in queue if s.num_preemptions]
        fresh = [s for s in queue if not s.num_preemptions]
        fresh.sort(key=lambda s: -len(self.prefix_cache.match(s.token_ids[: s.max_cacheable_prefix_len]).block_ids))  # type: ignore[union-attr]
        return preempted + fresh

    def _match(self, seq: Sequence) -> tuple[RadixNode | None, list[int]]:
        if self.prefix_cache is None:
            return None, []
        result = self.prefix_cache.match(seq.token_ids[: seq.max_cacheable_prefix_len])
        return result.node, result.block_ids

    def _should_wait_for_sibling(self, seq: Sequence, num_cached: int, prefilling: list[Sequence]) -> bool:
        """True when a running sequence (of `prefilling`) is about to compute more of this one's prefix
        than the cache holds: waiting a step or two lets this one reuse those blocks instead."""
        if self.prefix_cache is None:
            return False
        bs = self.block_size
        start = num_cached
        if start + bs > seq.max_cacheable_prefix_len:
            return False
        next_block = seq.token_ids[start : start + bs]
        for other in prefilling:
            # `other` has not computed that block yet (computed blocks are already in the cache).
            if (
                other.num_computed_tokens < start + bs
                and other.token_ids[start : start + bs] == next_block
            ):
                return True
        return False

    # -- blocks ----------------------------------------------------------------------------------
    def _make_free(self, num_blocks: int) -> bool:
        """Ensure `num_blocks` free blocks, evicting unlocked cache leaves if needed."""
        shortfall = num_blocks - self.allocator.num_free_blocks
        if shortfall > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(shortfall)
        return self.allocator.num_free_blocks >= num_blocks

    def _reserve(self, seq: Sequence, num_new: int, scheduled: set[int], plan: StepPlan) -> bool:
        """Give `seq` the blocks `num_new` more tokens need, preempting later-admitted unscheduled
        sequences if blocks run out. False when `seq` itself had to be preempted."""
        policy = self._policies[seq.seq_id]
        released = release_old_blocks(seq, policy, num_new, self.block_size)
        if released:
            self._drop_released(seq, released)
        num_needed = policy.num_blocks_needed(seq, num_new, self.block_size)
        while not self._make_free(num_needed):
            victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(victim, plan)
            if victim is seq:
                return False
        self._add_blocks(seq, num_needed, bool(released), plan)
        return True

    def _add_blocks(self, seq: Sequence, num_blocks: int, released: bool, plan: StepPlan) -> None:
        new_blocks = self.allocator.allocate(num_blocks)
        rotation = place_new_blocks(seq, self._policies[seq.seq_id], new_blocks, self.block_size, released)
        if rotation is not None:
            plan.sink_rotations.append(rotation)

    def _drop_released(self, seq: Sequence, released: list[int]) -> None:
        """Drop this sequence's references on blocks a streaming policy released. At the first release
        it also unpins its prefix-cache path: its table no longer maps positions to blocks one to one,
        and pinned prompt blocks would keep its memory from staying flat."""
        self.allocator.decref(released)
        if self.prefix_cache is not None and seq.num_dropped_tokens == len(released) * self.block_size:
            node = self._locked.pop(seq.seq_id, None)
            if node is not None:
                self.prefix_cache.unlock(node)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        plan.sink_rotations = [r for r in plan.sink_rotations if r.seq_id != seq.seq_id]
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        """Hand the sequence's computed full blocks to the prefix cache, then drop its references."""
        if self.prefix_cache is not None:
            self._insert_computed(seq)
            node = self._locked.pop(seq.seq_id, None)
            if node is not None:
                self.prefix_cache.unlock(node)
        self.allocator.decref(seq.block_table + seq.sink_source_blocks)
        seq.block_table = []
        seq.sink_source_blocks = []

    def _insert_computed(self, seq: Sequence) -> None:
        assert self.prefix_cache is not None
        if seq.num_dropped_tokens:
            return  # a streaming table past its first release no longer maps positions to blocks
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full == 0:
            return
        result = self.prefix_cache.insert(
            seq.token_ids[: num_full * self.block_size], seq.block_table[:num_full]
        )
        old = self._locked.get(seq.seq_id)
        if result.node is not old:
            self.prefix_cache.lock(result.node)
            if old is not None:
                self.prefix_cache.unlock(old)
            self._locked[seq.seq_id] = result.node

    # -- after the step --------------------------------------------------------------------------
    def on_step_done(self, plan: StepPlan) -> None:
        """Advance the computed counters; publish newly completed prompt blocks to the prefix cache so
        sibling requests can share them while this one is still running."""
        for chunk in plan.chunks:
            seq = chunk.seq
            before = seq.num_computed_tokens
            seq.num_computed_tokens += chunk.num_new_tokens
            if (
                self.prefix_cache is not None
                and seq.status is SequenceStatus.RUNNING
                and before < seq.num_prompt_tokens
                and seq.num_computed_tokens // self.block_size > before // self.block_size
            ):
                self._insert_computed(seq)
