"""Scheduler and block allocator: exact states after admission, chunking, preemption, finish, and
the overlapped loop's pending tokens."""

from __future__ import annotations

import pytest

from terse.backend.local.kv_cache import BlockAllocator
from terse.backend.local.kv_manager import KVManager
from terse.backend.local.scheduler import ScheduledChunk, Scheduler
from terse.backend.local.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from terse.backend.types import SamplingParams


def make_seq(seq_id: int, num_tokens: int, max_tokens: int = 16, first_token: int = 0) -> Sequence:
    ids = [first_token + seq_id * 1000 + i for i in range(num_tokens)]
    return Sequence(seq_id, ids, SamplingParams(max_tokens=max_tokens), max_len=4096)


def make_scheduler(num_blocks: int, budget: int, max_num_seqs: int = 8) -> Scheduler:
    kv = KVManager(num_blocks, 4, enable_prefix_cache=False)
    return Scheduler(kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def chunks(plan_chunks: list[ScheduledChunk]) -> list[tuple[Sequence, int]]:
    return [(c.seq, c.num_new_tokens) for c in plan_chunks]


def blocks(sched: Scheduler, seq: Sequence) -> list[int]:
    return sched.kv.table(seq).block_ids


def run_step(sched: Scheduler, next_token: int = 7) -> list[tuple[Sequence, int]]:
    """Schedule, mark the chunks computed, append a sampled token where a chunk reached the end."""
    plan = sched.schedule()
    sched.on_step_launched(plan)
    for chunk in plan.chunks:
        if chunk.seq.num_computed_tokens == chunk.seq.num_tokens:
            chunk.seq.token_ids.append(next_token)
    return chunks(plan.chunks)


def test_allocator_refcounts_and_free_order() -> None:
    alloc = BlockAllocator(4)
    a = alloc.allocate(2)
    assert a == [0, 1] and alloc.num_free_blocks == 2
    alloc.incref([1])
    assert alloc.decref(a) == 1  # block 0 freed, block 1 still held once
    assert alloc.ref_count(1) == 1 and alloc.num_free_blocks == 3
    assert alloc.allocate(2) == [0, 2]  # lowest free ids first: use stays packed at the pool's start
    alloc.decref([1])
    with pytest.raises(AssertionError, match="double free"):
        alloc.decref([1])


def test_admission_under_token_budget() -> None:
    sched = make_scheduler(num_blocks=100, budget=10)
    a, b, c = make_seq(0, 6), make_seq(1, 3), make_seq(2, 5)
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    assert plan.decodes == []
    assert chunks(plan.prefills) == [(a, 6), (b, 3), (c, 1)]
    assert (blocks(sched, a), blocks(sched, b), blocks(sched, c)) == ([0, 1], [2], [3])
    assert all(s.status is SequenceStatus.RUNNING for s in (a, b, c)) and not sched.waiting
    sched.on_step_launched(plan)
    a.token_ids.append(5)
    b.token_ids.append(5)
    plan = sched.schedule()
    # Decode phase first (one token each), then c continues its prefill with the rest of the budget.
    assert chunks(plan.decodes) == [(a, 1), (b, 1)]
    assert chunks(plan.prefills) == [(c, 4)]
    assert blocks(sched, b) == [2] and blocks(sched, c) == [3, 4]


def test_max_num_seqs_limits_admission() -> None:
    sched = make_scheduler(num_blocks=100, budget=100, max_num_seqs=2)
    seqs = [make_seq(i, 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    assert [c.seq for c in plan.prefills] == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]


def test_chunked_prefill_boundaries() -> None:
    sched = make_scheduler(num_blocks=100, budget=8)
    seq = make_seq(0, 13)
    sched.add(seq)
    assert run_step(sched) == [(seq, 8)]
    assert seq.num_computed_tokens == 8 and blocks(sched, seq) == [0, 1]
    assert run_step(sched) == [(seq, 5)]
    assert seq.num_computed_tokens == 13 and blocks(sched, seq) == [0, 1, 2, 3]
    assert seq.num_tokens == 14  # sampled one token after the last chunk
    assert run_step(sched) == [(seq, 1)]


def test_preemption_takes_latest_admitted_and_requeues_it_first() -> None:
    sched = make_scheduler(num_blocks=6, budget=100)
    a, b, c = make_seq(0, 7), make_seq(1, 7), make_seq(2, 7)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)  # 2 blocks each, pool full
    assert sched.kv.num_free_blocks == 0
    run_step(sched)  # 8th token of each fits the second block
    plan = sched.schedule()  # 9th token needs a third block each
    assert plan.preempted == [c]
    assert chunks(plan.decodes) == [(a, 1), (b, 1)]
    assert blocks(sched, a) == [0, 1, 4] and blocks(sched, b) == [2, 3, 5]  # c's blocks 4, 5, reused lowest first
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0
    assert list(sched.waiting) == [c] and sched.running == [a, b]
    assert sched.num_preemptions == 1 and c.num_preemptions == 1
    assert c.num_tokens == 9  # generated tokens are kept and recomputed with the prompt


def test_preemption_of_self_when_nothing_else_can_go() -> None:
    sched = make_scheduler(num_blocks=3, budget=100)
    a, b = make_seq(0, 8), make_seq(1, 4)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 2 blocks, b: 1 block
    plan = sched.schedule()  # a's 9th token needs a block: b (later admitted) goes
    assert plan.preempted == [b] and chunks(plan.decodes) == [(a, 1)]
    sched.on_step_launched(plan)


def test_blocks_return_on_finish_and_cancel() -> None:
    sched = make_scheduler(num_blocks=10, budget=6)
    a, b, c = make_seq(0, 5), make_seq(1, 9), make_seq(2, 3)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    assert sched.kv.num_free_blocks < 10
    sched.finish(b)  # cancel mid-prefill
    sched.finish(c)  # cancel while still waiting
    assert b.status is SequenceStatus.FINISHED
    assert c not in sched.waiting
    run_step(sched)
    sched.finish(a)
    assert sched.kv.num_free_blocks == 10 and not sched.has_work()


def test_pending_tokens_decode_on_but_stop_at_length_and_block_admission() -> None:
    sched = make_scheduler(num_blocks=10, budget=16)
    a = make_seq(0, 3, max_tokens=2)
    sched.add(a)
    plan = sched.schedule()
    sched.on_step_launched(plan)
    a.append_pending()  # step 1 sampled a's first token; its value is still on the device
    plan = sched.schedule()
    assert chunks(plan.decodes) == [(a, 1)]  # decoded from the device-side token
    sched.on_step_launched(plan)
    a.append_pending()  # a's second (last allowed) token: nothing further to schedule
    assert a.token_ids[-2:] == [PENDING_TOKEN, PENDING_TOKEN] and a.reached_length_limit
    assert sched.schedule().is_empty
    a.resolve_pending(11)
    a.resolve_pending(12)
    assert a.output_ids == [11, 12] and a.num_pending_tokens == 0
    b = make_seq(1, 5)
    b.append_pending()  # e.g. preempted while its last token was in flight: its prefill needs the value
    sched.add(b)
    assert sched.schedule().prefills == []
    b.resolve_pending(3)
    assert chunks(sched.schedule().prefills) == [(b, 6)]
