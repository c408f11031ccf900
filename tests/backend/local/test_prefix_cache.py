"""Radix prefix cache: exact tree states after inserts, splits, matches, locks and evictions."""

from __future__ import annotations

from terse.backend.local.kv_cache import BlockAllocator
from terse.backend.local.kv_manager import KVManager
from terse.backend.local.prefix_cache import RadixPrefixCache
from terse.backend.local.scheduler import Scheduler
from terse.backend.local.sequence import Sequence
from terse.backend.types import SamplingParams

BS = 4


def tokens(*blocks: int) -> list[int]:
    """One block of 4 tokens per argument: block n is [n*10, n*10+1, n*10+2, n*10+3]."""
    return [b * 10 + i for b in blocks for i in range(BS)]


def make_cache(num_blocks: int = 32) -> tuple[RadixPrefixCache, BlockAllocator]:
    alloc = BlockAllocator(num_blocks)
    return RadixPrefixCache(alloc, BS), alloc


def insert_fresh(cache: RadixPrefixCache, alloc: BlockAllocator, ids: list[int]) -> list[int]:
    """Insert `ids` with newly allocated blocks, then drop the caller's references (as a finished request)."""
    blocks = alloc.allocate(len(ids) // BS)
    cache.insert(ids, blocks)
    alloc.decref(blocks)
    return blocks


def test_insert_split_and_match() -> None:
    cache, alloc = make_cache()
    assert insert_fresh(cache, alloc, tokens(1, 2, 3)) == [0, 1, 2]
    assert cache.describe() == [(0, 12, (0, 1, 2), 0)]
    insert_fresh(cache, alloc, tokens(1, 2, 5, 6))  # diverges after 2 blocks: split
    assert cache.describe() == [(0, 8, (0, 1), 0), (1, 4, (2,), 0), (1, 8, (5, 6), 0)]
    assert cache.num_cached_blocks == 5
    assert alloc.num_free_blocks == 32 - 5 and all(alloc.ref_count(b) == 1 for b in (0, 1, 2, 5, 6))

    result = cache.match(tokens(1, 2, 5) + [99, 98])  # the partial tail block never matches
    assert result.block_ids == [0, 1, 5]
    assert cache.describe() == [(0, 8, (0, 1), 0), (1, 4, (2,), 0), (1, 4, (5,), 0), (2, 4, (6,), 0)]
    assert result.node.block_ids == [5]
    assert cache.match(tokens(7)).block_ids == []
    assert cache.match(tokens(1)[:3]).block_ids == []


def test_insert_of_cached_prefix_keeps_tree_blocks() -> None:
    cache, alloc = make_cache()
    insert_fresh(cache, alloc, tokens(1, 2))
    dup = alloc.allocate(3)  # another request computed the same 2 blocks itself, plus one more
    result = cache.insert(tokens(1, 2, 3), dup)
    assert result.num_new_blocks == 1
    assert cache.describe() == [(0, 8, (0, 1), 0), (1, 4, (dup[2],), 0)]
    assert alloc.ref_count(dup[0]) == 1 and alloc.ref_count(dup[2]) == 2


def test_lock_pins_path_and_eviction_is_lru() -> None:
    cache, alloc = make_cache()
    insert_fresh(cache, alloc, tokens(1, 2))  # blocks 0, 1
    insert_fresh(cache, alloc, tokens(1, 3))  # split; adopts block 3 (its copy of [1], block 2, is freed)
    insert_fresh(cache, alloc, tokens(4))  # block 2 (the lowest free id)
    cache.match(tokens(1, 2))  # refresh [1]-[2]: least recent leaf is now [1]-[3], then [4]
    assert cache.describe() == [(0, 4, (0,), 0), (1, 4, (1,), 0), (1, 4, (3,), 0), (0, 4, (2,), 0)]
    assert cache.evict(1) == 1
    assert cache.describe() == [(0, 4, (0,), 0), (1, 4, (1,), 0), (0, 4, (2,), 0)]
    node = cache.match(tokens(1, 2)).node
    cache.lock(node)
    assert cache.describe() == [(0, 4, (0,), 1), (1, 4, (1,), 1), (0, 4, (2,), 0)]
    assert cache.evict(10) == 1  # only the unlocked leaf [4] can go
    assert cache.describe() == [(0, 4, (0,), 1), (1, 4, (1,), 1)]
    cache.unlock(node)
    assert cache.evict(10) == 2  # the leaf, then its parent once it became a leaf
    assert cache.describe() == [] and alloc.num_free_blocks == 32 and cache.num_cached_blocks == 0


def test_lookup_is_read_only_and_commit_splits_once() -> None:
    cache, alloc = make_cache()
    insert_fresh(cache, alloc, tokens(1, 2, 3))
    insert_fresh(cache, alloc, tokens(4))
    before = cache.describe()
    clock = cache._clock
    hit = cache.lookup(tokens(1, 2, 9))  # ends inside the [1, 2, 3] edge
    assert hit.block_ids == [0, 1] and hit.num_node_blocks == 2
    assert cache.describe() == before and cache._clock == clock  # no split, no LRU refresh
    node = cache.commit(hit)
    assert cache.describe() == [(0, 8, (0, 1), 0), (1, 4, (2,), 0), (0, 4, (3,), 0)]
    assert node.block_ids == [0, 1]
    # The commit refreshed the path down to the split point only: the cut-off [3] is the oldest leaf.
    assert cache.evict(1) == 1 and cache.describe() == [(0, 8, (0, 1), 0), (0, 4, (3,), 0)]


def test_split_keeps_lock_counts() -> None:
    cache, alloc = make_cache()
    insert_fresh(cache, alloc, tokens(1, 2, 3))
    node = cache.match(tokens(1, 2, 3)).node
    cache.lock(node)
    cache.match(tokens(1, 9))  # splits the locked edge after block 1
    assert cache.describe() == [(0, 4, (0,), 1), (1, 8, (1, 2), 1)]
    cache.unlock(node)
    assert cache.describe() == [(0, 4, (0,), 0), (1, 8, (1, 2), 0)]


def _seq(seq_id: int, ids: list[int]) -> Sequence:
    return Sequence(seq_id, ids, SamplingParams(max_tokens=4), max_len=4096)


def test_scheduler_prefills_only_uncached_suffix_and_holds_back_siblings() -> None:
    kv = KVManager(64, BS)
    cache = kv.prefix_cache
    assert cache is not None
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=8)
    shared = tokens(1, 2, 3, 4)  # 16 shared tokens
    a, b, c = _seq(0, shared + [5]), _seq(1, shared + [6, 7]), _seq(2, tokens(8) + [1])
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    # b would share a's uncomputed prefix: it waits; c shares nothing and takes the leftover budget.
    assert [(ch.seq, ch.num_new_tokens) for ch in plan.prefills] == [(a, 8)]
    sched.on_step_launched(plan)
    assert cache.describe() == [(0, 8, (0, 1), 1)]  # a's first 2 blocks are published and locked
    plan = sched.schedule()
    assert [(ch.seq, ch.num_new_tokens) for ch in plan.prefills] == [(a, 8)]
    sched.on_step_launched(plan)
    plan = sched.schedule()
    # a has one token left (a decode-shaped step); b reuses 16 cached tokens and prefills 2; c gets the rest.
    assert [(ch.seq, ch.num_new_tokens) for ch in plan.decodes] == [(a, 1)]
    assert [(ch.seq, ch.num_new_tokens) for ch in plan.prefills] == [(b, 2), (c, 5)]
    assert b.num_cached_tokens == 16 and kv.table(b).block_ids[:4] == kv.table(a).block_ids[:4]
    assert kv.num_cached_tokens == 16


def test_scheduler_prefers_longest_cached_prefix() -> None:
    kv = KVManager(64, BS)
    cache = kv.prefix_cache
    assert cache is not None
    insert_fresh(cache, kv.allocator, tokens(1, 2, 3))
    insert_fresh(cache, kv.allocator, tokens(1, 5))  # splits [1, 2, 3] after block 1
    sched = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=64)
    cold, warm, half = _seq(0, tokens(7, 8) + [1]), _seq(1, tokens(1, 2, 3) + [1]), _seq(2, tokens(1, 2, 9) + [1])
    for seq in (cold, half, warm):
        sched.add(seq)
    before = cache.describe()
    clock = cache._clock
    plan = sched.schedule()
    assert [(ch.seq, ch.num_new_tokens) for ch in plan.prefills] == [(warm, 1)]
    # Ordering looked `half` up (it ends inside the [2, 3] edge) without splitting or touching the tree;
    # only the admitted `warm` committed its match (one LRU refresh) and pinned its path.
    assert [row[:3] for row in cache.describe()] == [row[:3] for row in before]
    assert cache._clock == clock + 1
    assert cache.describe() == [(0, 4, (0,), 1), (1, 8, (1, 2), 1), (1, 4, (4,), 0)]
