"""Radix prefix cache: a radix tree over token ids whose nodes own KV blocks.

Only whole blocks are shared: every edge holds a multiple of `block_size` tokens and the KV blocks
computed for them. A request's partial last block is never cached (it is recomputed), so two prompts
that agree on 37 tokens with block size 16 share 2 blocks:

    root
     └── [t0..t31]  blocks (4, 9)          <- shared by A and B (locked twice while both run)
          ├── [A32..A47]  block (5)        <- A only
          └── [B32..B63]  blocks (7, 1)    <- B only

Reference counting: the tree holds one allocator reference on each block it owns. A sequence that
uses cached blocks holds its own reference per block *and* a lock on the deepest node it uses; a lock
pins the node and all its ancestors. Hence an unlocked node's blocks are referenced by the tree alone,
and evicting it really frees them.

Contract (`PrefixCache`):
- `lookup(token_ids)`: longest cached whole-block prefix -> `PrefixHit`. Read-only: no split, no LRU
  refresh, so ordering a queue by it changes nothing for requests that are not admitted. A hit is valid
  until the tree next changes (an insert, commit or eviction).
- `commit(hit)`: make the hit the request's: split the node the match ends inside (so a node ends
  exactly at the match) and refresh the path's LRU time; returns that node (not locked).
  `match(token_ids)` is `lookup` + `commit` in one call.
- `lock(node)` / `unlock(node)`: pin / unpin the path root..node. Callers lock a match before asking
  the allocator for more blocks (an allocation may evict), and unlock exactly once per lock.
- `insert(token_ids, block_ids)`: adopt the blocks of a computed prefix (len(token_ids) ==
  len(block_ids) * block_size). Parts already cached keep the tree's blocks (the caller's duplicates
  stay the caller's); new parts take one reference on the caller's blocks. Returns
  `InsertResult(num_new_blocks, node)` with `node` the deepest node of the prefix (not locked).
- `evict(num_blocks)`: free at least `num_blocks` blocks if possible by removing unlocked leaves,
  least recently used first; returns the number freed. Locked nodes are never evicted.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

from terse.backend.local.kv_cache import BlockAllocator


class RadixNode:
    """One edge of the tree: `token_ids` (a multiple of block_size long) and their `block_ids`."""

    __slots__ = ("block_ids", "children", "last_access", "lock_count", "parent", "token_ids")

    def __init__(self, token_ids: list[int], block_ids: list[int], parent: RadixNode | None) -> None:
        self.token_ids = token_ids
        self.block_ids = block_ids
        self.parent = parent
        self.children: dict[tuple[int, ...], RadixNode] = {}  # keyed by the child's first block of tokens
        self.lock_count = 0
        self.last_access = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children


class PrefixHit(NamedTuple):
    """Where a lookup's match ends: `num_node_blocks` blocks into `node` (all of its blocks, or fewer
    when the match ends inside the node's edge)."""

    block_ids: list[int]
    """Cached blocks covering the matched prefix, in order."""
    node: RadixNode
    """Deepest node the match reaches (the root when nothing matched)."""
    num_node_blocks: int
    """Blocks of `node` inside the match."""


class MatchResult(NamedTuple):
    block_ids: list[int]
    """Cached blocks covering the matched prefix, in order (len * block_size tokens)."""
    node: RadixNode
    """Deepest node of the match (the root when nothing matched)."""


class InsertResult(NamedTuple):
    num_new_blocks: int
    """Blocks the tree newly adopted (took a reference on)."""
    node: RadixNode
    """Deepest node of the inserted prefix."""


class PrefixCache(ABC):
    """See the module docstring for the contract."""

    @abstractmethod
    def lookup(self, token_ids: Sequence[int]) -> PrefixHit: ...

    @abstractmethod
    def commit(self, hit: PrefixHit) -> RadixNode: ...

    def match(self, token_ids: Sequence[int]) -> MatchResult:
        hit = self.lookup(token_ids)
        return MatchResult(hit.block_ids, self.commit(hit))

    @abstractmethod
    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> InsertResult: ...

    @abstractmethod
    def lock(self, node: RadixNode) -> None: ...

    @abstractmethod
    def unlock(self, node: RadixNode) -> None: ...

    @abstractmethod
    def evict(self, num_blocks: int) -> int: ...

    @property
    @abstractmethod
    def num_cached_blocks(self) -> int: ...


class RadixPrefixCache(PrefixCache):
    """The radix tree implementation of `PrefixCache`. Pure Python; single-threaded (engine loop)."""

    def __init__(self, allocator: BlockAllocator, block_size: int) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.root = RadixNode([], [], None)
        self.root.lock_count = 1  # the root is never evicted
        self._clock = 0
        self._num_cached_blocks = 0
        self.num_evicted_blocks = 0

    @property
    def num_cached_blocks(self) -> int:
        return self._num_cached_blocks

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _key(self, token_ids: Sequence[int], start: int) -> tuple[int, ...]:
        return tuple(token_ids[start : start + self.block_size])

    def _num_matching_blocks(self, node: RadixNode, token_ids: Sequence[int], start: int, end: int) -> int:
        """Whole blocks of `node` equal to token_ids[start:end]."""
        bs, n = self.block_size, 0
        limit = min(len(node.token_ids), end - start) // bs
        while n < limit and node.token_ids[n * bs : (n + 1) * bs] == list(token_ids[start + n * bs : start + (n + 1) * bs]):
            n += 1
        return n

    def _split(self, node: RadixNode, num_blocks: int) -> RadixNode:
        """Cut `node` after `num_blocks` blocks; return the new upper part (the parent of `node`)."""
        cut = num_blocks * self.block_size
        assert node.parent is not None and 0 < cut < len(node.token_ids)
        upper = RadixNode(node.token_ids[:cut], node.block_ids[:num_blocks], node.parent)
        upper.lock_count = node.lock_count  # every lock through `node` also pins its prefix
        upper.last_access = node.last_access
        node.parent.children[self._key(upper.token_ids, 0)] = upper
        node.token_ids = node.token_ids[cut:]
        node.block_ids = node.block_ids[num_blocks:]
        node.parent = upper
        upper.children[self._key(node.token_ids, 0)] = node
        return upper

    def lookup(self, token_ids: Sequence[int]) -> PrefixHit:
        node, pos, blocks, num_node_blocks = self.root, 0, [], 0
        num_full = len(token_ids) // self.block_size * self.block_size
        while pos < num_full:
            child = node.children.get(self._key(token_ids, pos))
            if child is None:
                break
            n = self._num_matching_blocks(child, token_ids, pos, num_full)
            blocks.extend(child.block_ids[:n])
            node, num_node_blocks = child, n
            if n * self.block_size < len(child.token_ids):
                break  # the match ends inside this edge
            pos += len(child.token_ids)
        return PrefixHit(blocks, node, num_node_blocks)

    def commit(self, hit: PrefixHit) -> RadixNode:
        node = hit.node
        if node is not self.root and hit.num_node_blocks < len(node.block_ids):
            node = self._split(node, hit.num_node_blocks)
        now = self._tick()
        cur: RadixNode | None = node
        while cur is not None and cur is not self.root:
            cur.last_access = now
            cur = cur.parent
        return node

    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> InsertResult:
        assert len(token_ids) == len(block_ids) * self.block_size, "insert whole blocks only"
        hit = self.lookup(token_ids)
        node, pos = self.commit(hit), len(hit.block_ids) * self.block_size
        if pos == len(token_ids):
            return InsertResult(0, node)
        new_blocks = list(block_ids[pos // self.block_size :])
        leaf = RadixNode(list(token_ids[pos:]), new_blocks, node)
        leaf.last_access = self._clock
        node.children[self._key(leaf.token_ids, 0)] = leaf
        self.allocator.incref(new_blocks)
        self._num_cached_blocks += len(new_blocks)
        return InsertResult(len(new_blocks), leaf)

    def lock(self, node: RadixNode) -> None:
        cur: RadixNode | None = node
        while cur is not None and cur is not self.root:
            cur.lock_count += 1
            cur = cur.parent

    def unlock(self, node: RadixNode) -> None:
        cur: RadixNode | None = node
        while cur is not None and cur is not self.root:
            assert cur.lock_count > 0, "unlock without lock"
            cur.lock_count -= 1
            cur = cur.parent

    def evictable_leaves(self) -> list[RadixNode]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.is_leaf and node.lock_count == 0:
                leaves.append(node)
        return leaves

    @property
    def num_evictable_blocks(self) -> int:
        """Blocks held by unlocked nodes (all of them become free if evicted, leaves first)."""
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.lock_count == 0:
                total += len(node.block_ids)
        return total

    def evict(self, num_blocks: int) -> int:
        # A heap keyed by LRU time; a parent left childless (and unlocked) joins the heap in turn.
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self.evictable_leaves()]
        heapq.heapify(heap)
        num_freed = 0
        while heap and num_freed < num_blocks:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._key(leaf.token_ids, 0)]
            num_freed += self.allocator.decref(leaf.block_ids)
            self.num_evicted_blocks += len(leaf.block_ids)
            self._num_cached_blocks -= len(leaf.block_ids)
            leaf.parent = None
            if parent is not self.root and parent.is_leaf and parent.lock_count == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return num_freed

    def describe(self) -> list[tuple[int, int, tuple[int, ...], int]]:
        """The tree in depth-first order (children by first token): (depth, num_tokens, block_ids,
        lock_count) per node, root excluded. For tests and debugging."""
        rows: list[tuple[int, int, tuple[int, ...], int]] = []

        def visit(node: RadixNode, depth: int) -> None:
            for key in sorted(node.children):
                child = node.children[key]
                rows.append((depth, len(child.token_ids), tuple(child.block_ids), child.lock_count))
                visit(child, depth + 1)

        visit(self.root, 0)
        return rows
