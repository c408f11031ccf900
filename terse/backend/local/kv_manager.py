"""The KV manager: the one owner of KV memory. It holds the block allocator, the radix prefix cache and
each running sequence's `SeqKV` (its block table under its KV policy), and answers the scheduler's
questions in sequence terms:

    lookup(seq)                  read-only: how many prompt tokens the prefix cache would supply
    allocate(seq, n, lookup)     blocks for n more tokens (at admission: commit the lookup first) -> bool
    free(seq)                    publish the computed full blocks to the prefix cache, drop the rest
    cache_computed(seq)          publish newly completed prompt blocks while the sequence still runs
    take_pending_copies()        KV block copies the next step must apply before it runs
    speculation_span(seq)        read-only: positions from the next query on that see the same KV (drafts
                                 stay within it, so verifying them sees what one-token steps would)
    rollback(seq, n)             drop the blocks of rejected draft positions (none below position n)

Nobody else touches the allocator, the tree or a policy. Admission of a sequence with a cached prefix
(block size 4, 10 prompt tokens, 8 of them cached in blocks 7 and 2; 6 free blocks, lowest id first):

    lookup      -> 8 tokens: blocks [7, 2] (read-only; the node is not split, no LRU refresh)
    allocate(seq, 2, lookup):
        pin the matched path, evict unpinned LRU leaves if fewer than ceil(10 / 4) - 2 = 1 block is free,
        commit the match (split the node it ends in, refresh LRU), take a reference on 7 and 2,
        allocate block 0 -> SeqKV.block_ids = [7, 2, 0]
    free(seq)   -> full computed blocks [7, 2] (+ 0 once its 4 tokens are computed) stay in the tree;
                   the sequence's references are dropped; unreferenced blocks become free

A sequence pins (locks) the deepest prefix-cache node it uses, so a pinned path is never evicted under
it. Once its policy releases blocks (streaming), its table no longer maps positions to blocks one to
one: it unpins its path and publishes nothing more.
"""

from __future__ import annotations

from typing import NamedTuple

from terse.backend.local.kv_cache import BlockAllocator
from terse.backend.local.kv_policy import KVCopy, KVPolicy, SeqKV, policy_for
from terse.backend.local.prefix_cache import PrefixHit, RadixPrefixCache
from terse.backend.local.sequence import Sequence
from terse.backend.types import StreamingKV


class PrefixLookup(NamedTuple):
    """A read-only prefix-cache lookup for one sequence (valid until the tree next changes)."""

    num_tokens: int
    """Prompt tokens (whole blocks) the cache would supply."""
    hit: PrefixHit | None
    """What `allocate` commits at admission (None: no prefix cache or nothing matched)."""


NO_PREFIX = PrefixLookup(0, None)


class KVManager:
    """Block allocator + radix prefix cache + per-sequence KV policies. Single-threaded (engine loop)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_cache: bool = True,
        default_streaming_kv: StreamingKV | None = None,
    ) -> None:
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_cache = RadixPrefixCache(self.allocator, block_size) if enable_prefix_cache else None
        self.default_streaming_kv = default_streaming_kv
        self._seqs: dict[int, SeqKV] = {}
        self._pending_copies: dict[int, KVCopy] = {}
        self.num_admitted_prompt_tokens = 0
        """Prompt tokens of admitted sequences (counted again after a preemption)."""
        self.num_cached_tokens = 0
        """Of those, tokens whose KV came from the prefix cache."""

    # -- read-only -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self.prefix_cache.num_cached_blocks if self.prefix_cache is not None else 0

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by running sequences or the prefix cache."""
        return self.allocator.num_blocks - self.allocator.num_free_blocks

    def policy(self, seq: Sequence) -> KVPolicy:
        """The sequence's KV policy: its `streaming_kv`, else the engine default, else dense."""
        return policy_for(seq.params.streaming_kv or self.default_streaming_kv)

    def max_blocks(self, seq: Sequence) -> int:
        """Most blocks `seq` can ever hold under its policy."""
        return self.policy(seq).max_blocks(seq, self.block_size)

    def holds(self, seq: Sequence) -> bool:
        """Whether `seq` is admitted (holds a KV layout)."""
        return seq.seq_id in self._seqs

    def table(self, seq: Sequence) -> SeqKV:
        """The KV layout of an admitted sequence (read it; never mutate it)."""
        return self._seqs[seq.seq_id]

    def lookup(self, seq: Sequence) -> PrefixLookup:
        """Cached whole-block prefix a fresh admission of `seq` would reuse. Changes nothing."""
        if self.prefix_cache is None:
            return NO_PREFIX
        hit = self.prefix_cache.lookup(seq.token_ids[: seq.max_cacheable_prefix_len])
        if not hit.block_ids:
            return NO_PREFIX
        return PrefixLookup(len(hit.block_ids) * self.block_size, hit)

    def speculation_span(self, seq: Sequence) -> int:
        """How many query positions from `seq.num_computed_tokens` on see the same KV under its policy."""
        kv = self._seqs[seq.seq_id]
        return kv.policy.max_span(kv, seq.num_computed_tokens, self.block_size)

    # -- allocation ------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, lookup: PrefixLookup = NO_PREFIX) -> bool:
        """Give `seq` KV slots for `num_new_tokens` more tokens, evicting unpinned prefix-cache leaves
        if needed. The first call admits the sequence: its computed prefix is `lookup` (taken just
        before, with nothing changed since), which is committed only if the blocks are there. False
        when they are not (an admission then leaves no trace; a running sequence keeps what it had,
        minus blocks its policy released)."""
        kv = self._seqs.get(seq.seq_id)
        if kv is None:
            return self._admit(seq, num_new_tokens, lookup)
        first = seq.num_computed_tokens
        released = kv.policy.release(kv, first, self.block_size)
        if released:
            self.allocator.decref(released)
            self._unpin(kv)
        needed = kv.policy.num_blocks_needed(kv, first + num_new_tokens, self.block_size)
        if not self._make_free(needed):
            return False
        self._place(seq, kv, needed)
        return True

    def _admit(self, seq: Sequence, num_new_tokens: int, lookup: PrefixLookup) -> bool:
        kv = SeqKV(self.policy(seq), list(lookup.hit.block_ids) if lookup.hit is not None else [])
        first = lookup.num_tokens
        # Not yet referenced by this sequence: blocks a long cached prefix has past a streaming window
        # are simply left out of its table.
        kv.policy.release(kv, first, self.block_size)
        needed = kv.policy.num_blocks_needed(kv, first + num_new_tokens, self.block_size)
        hit, cache = lookup.hit, self.prefix_cache
        if hit is not None and cache is not None:
            cache.lock(hit.node)  # pin the match before an eviction could take it
        if not self._make_free(needed):
            if hit is not None and cache is not None:
                cache.unlock(hit.node)
            return False
        if hit is not None and cache is not None:
            node = cache.commit(hit)  # a split copies the pin to the upper part: move it there
            cache.lock(node)
            cache.unlock(hit.node)
            kv.locked = node
        self.allocator.incref(kv.block_ids)
        self._seqs[seq.seq_id] = kv
        if kv.num_dropped_tokens:
            self._unpin(kv)
        self._place(seq, kv, needed)
        self.num_admitted_prompt_tokens += seq.num_tokens
        self.num_cached_tokens += first
        return True

    def _make_free(self, num_blocks: int) -> bool:
        shortfall = num_blocks - self.allocator.num_free_blocks
        if shortfall > 0 and self.prefix_cache is not None:
            self.prefix_cache.evict(shortfall)
        return self.allocator.num_free_blocks >= num_blocks

    def _place(self, seq: Sequence, kv: SeqKV, num_blocks: int) -> None:
        copy = kv.policy.place(kv, self.allocator.allocate(num_blocks), self.block_size)
        if copy is not None:
            self._pending_copies[seq.seq_id] = copy  # a later copy supersedes: both read the originals

    def _unpin(self, kv: SeqKV) -> None:
        if kv.locked is not None and self.prefix_cache is not None:
            self.prefix_cache.unlock(kv.locked)
        kv.locked = None

    def take_pending_copies(self) -> list[KVCopy]:
        """Copies to apply before the next step (each once)."""
        copies = list(self._pending_copies.values())
        self._pending_copies.clear()
        return copies

    # -- release ---------------------------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Release everything `seq` holds; its computed full blocks stay in the prefix cache."""
        kv = self._seqs.pop(seq.seq_id, None)
        if kv is None:
            return
        self._pending_copies.pop(seq.seq_id, None)
        if self.prefix_cache is not None:
            self._publish(seq, kv)
        self._unpin(kv)
        self.allocator.decref(kv.block_ids + kv.side_block_ids)

    def rollback(self, seq: Sequence, num_tokens: int) -> None:
        """Release the blocks that only positions from `num_tokens` on use: blocks allocated for draft
        positions that were rejected. Those blocks hold no published KV (publication stops at the computed
        tokens) and belong to this sequence alone. Stale KV left in a kept block past `num_tokens` is
        never read (attention stops at the context length) and is overwritten when those positions are
        computed again."""
        kv = self._seqs.get(seq.seq_id)
        if kv is not None:
            self.allocator.decref(kv.policy.truncate(kv, num_tokens, self.block_size))

    def cache_computed(self, seq: Sequence) -> None:
        """Publish the full blocks `seq` has computed so far (siblings can share them at once)."""
        kv = self._seqs.get(seq.seq_id)
        if kv is not None and self.prefix_cache is not None:
            self._publish(seq, kv)

    def _publish(self, seq: Sequence, kv: SeqKV) -> None:
        """Insert the computed full blocks into the tree and move the pin to the deepest node."""
        assert self.prefix_cache is not None
        if kv.num_dropped_tokens:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(kv.block_ids))
        if num_full == 0:
            return
        result = self.prefix_cache.insert(seq.token_ids[: num_full * self.block_size], kv.block_ids[:num_full])
        if result.node is not kv.locked:
            self.prefix_cache.lock(result.node)
            self._unpin(kv)
            kv.locked = result.node
