"""The KV manager: exact block ids, reference counts, pins and eviction order through admission,
growth, failure, publication, streaming releases and pending copies."""

from __future__ import annotations

from terse.backend.local.kv_manager import NO_PREFIX, KVManager
from terse.backend.local.kv_policy import KVCopy
from terse.backend.local.sequence import Sequence
from terse.backend.types import SamplingParams, StreamingKV

BS = 4


def tokens(*blocks: int) -> list[int]:
    """One block of 4 tokens per argument: block n is [n*10, n*10+1, n*10+2, n*10+3]."""
    return [b * 10 + i for b in blocks for i in range(BS)]


def seq(seq_id: int, ids: list[int], streaming: StreamingKV | None = None) -> Sequence:
    return Sequence(seq_id, ids, SamplingParams(max_tokens=64, streaming_kv=streaming), max_len=4096)


def run(kv: KVManager, s: Sequence, num_new: int) -> None:
    """Allocate for num_new tokens (admitting with a fresh lookup if needed) and mark them computed."""
    lookup = NO_PREFIX if kv.holds(s) else kv.lookup(s)
    if not kv.holds(s):
        s.num_computed_tokens = lookup.num_tokens
    assert kv.allocate(s, num_new, lookup)
    s.num_computed_tokens += num_new


def refcounts(kv: KVManager, blocks: range | list[int]) -> list[int]:
    return [kv.allocator.ref_count(b) for b in blocks]


def test_admission_commits_the_lookup_and_free_publishes() -> None:
    kv = KVManager(16, BS)
    cache = kv.prefix_cache
    assert cache is not None
    a = seq(0, tokens(1, 2, 3) + [7])
    run(kv, a, a.num_tokens)  # fresh: blocks 0..3, lowest ids first
    assert kv.table(a).block_ids == [0, 1, 2, 3]
    kv.free(a)  # its 3 full blocks stay in the tree; the partial 4th is freed
    assert cache.describe() == [(0, 12, (0, 1, 2), 0)]
    assert refcounts(kv, range(4)) == [1, 1, 1, 0] and kv.num_free_blocks == 13

    b = seq(1, tokens(1, 2, 5, 6) + [7])
    lookup = kv.lookup(b)
    assert lookup.num_tokens == 8 and cache.describe() == [(0, 12, (0, 1, 2), 0)]  # read-only
    assert kv.allocate(b, b.num_tokens - 8, lookup)
    # The match is committed (split after 2 blocks) and pinned; 3 new blocks: 3, 4, 5.
    assert cache.describe() == [(0, 8, (0, 1), 1), (1, 4, (2,), 0)]
    assert kv.table(b).block_ids == [0, 1, 3, 4, 5]
    assert refcounts(kv, range(6)) == [2, 2, 1, 1, 1, 1]
    assert (kv.num_admitted_prompt_tokens, kv.num_cached_tokens) == (13 + 17, 8)
    b.num_computed_tokens = b.num_tokens
    kv.cache_computed(b)  # publishes [5, 6] under the pinned path and moves the pin down
    assert cache.describe() == [(0, 8, (0, 1), 1), (1, 4, (2,), 0), (1, 8, (3, 4), 1)]
    kv.free(b)
    assert cache.describe() == [(0, 8, (0, 1), 0), (1, 4, (2,), 0), (1, 8, (3, 4), 0)]
    assert refcounts(kv, range(6)) == [1, 1, 1, 1, 1, 0] and kv.num_cached_blocks == 5


def test_failed_admission_leaves_no_trace() -> None:
    kv = KVManager(6, BS)
    cache = kv.prefix_cache
    assert cache is not None
    a, holder = seq(0, tokens(1, 2, 3) + [7]), seq(1, tokens(8, 9))
    run(kv, a, a.num_tokens)
    kv.free(a)  # tree: [1, 2, 3] on blocks 0..2
    run(kv, holder, 8)  # blocks 3, 4 held by a running sequence; 1 block free
    b = seq(2, tokens(1, 2, 5, 6, 4) + [7])  # reuses 2 blocks, needs 4 more: only 1 free + 1 evictable
    clock = cache._clock
    assert not kv.allocate(b, b.num_tokens - 8, kv.lookup(b))
    assert cache.describe() == [(0, 12, (0, 1, 2), 0)]  # not split, not pinned, not evicted
    assert cache._clock == clock and refcounts(kv, range(6)) == [1, 1, 1, 1, 1, 0]
    assert not kv.holds(b) and kv.take_pending_copies() == []


def test_growth_evicts_unpinned_leaves_least_recent_first() -> None:
    kv = KVManager(8, BS)
    cache = kv.prefix_cache
    assert cache is not None
    for i, ids in enumerate((tokens(1, 2), tokens(3), tokens(4, 5))):  # inserted in this order
        s = seq(i, ids + [9])
        run(kv, s, s.num_tokens)
        kv.free(s)
    assert cache.describe() == [(0, 8, (0, 1), 0), (0, 4, (2,), 0), (0, 8, (3, 4), 0)]
    reader = seq(10, tokens(3) + [1])
    run(kv, reader, 1)  # reuses [3] (block 2), pins it, takes block 5; free: 6, 7
    grower = seq(11, tokens(6))
    run(kv, grower, 4)  # block 6
    assert kv.allocate(grower, 12)  # 3 more blocks: 1 free; evict [1, 2] (older than [4, 5]) for 2 more
    assert kv.table(grower).block_ids == [6, 0, 1, 7]
    assert cache.describe() == [(0, 4, (2,), 1), (0, 8, (3, 4), 0)]
    assert not kv.allocate(grower, 12 + 16)  # 4 more: [4, 5] can go (2), the pinned [3] cannot
    assert cache.describe() == [(0, 4, (2,), 1)] and kv.num_free_blocks == 2


def test_streaming_releases_blocks_and_queues_the_sink_rewrite() -> None:
    kv = KVManager(32, BS)
    s = seq(0, list(range(100, 112)), StreamingKV(sink_tokens=4, window_tokens=8))
    run(kv, s, 12)  # 3 blocks: 0, 1, 2; nothing released yet
    assert kv.table(s).block_ids == [0, 1, 2]
    for _ in range(5):  # decode to position 16: the first query past sinks + window + one block
        s.token_ids.append(7)
        run(kv, s, 1)
    table = kv.table(s)
    # At position 15 the window (8..15) leaves block 1 (positions 4..7) behind: released, and reused at
    # once (lowest id) for the private sink copy; the original sink block 0 stays held on the side.
    # Position 16 then takes block 4.
    assert (table.block_ids, table.num_dropped_tokens, table.side_block_ids) == ([1, 2, 3, 4], 4, [0])
    assert kv.take_pending_copies() == [KVCopy([0], [1], 4)]  # sink copy re-rotated by the 4 dropped
    assert refcounts(kv, range(6)) == [1, 1, 1, 1, 1, 0] and kv.prefix_cache is not None
    assert kv.prefix_cache.num_cached_blocks == 0  # a released table publishes nothing
    kv.free(s)
    assert kv.num_free_blocks == 32 and kv.take_pending_copies() == []
