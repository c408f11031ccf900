"""The paged KV pool and its block allocator.

The pool is one tensor per engine, [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads,
head_dim]; a sequence's KV lives in the blocks its block table lists. The allocator hands out block
ids from a free list and counts references, so a block can be shared by several sequences and the
prefix cache at once; it returns to the free list when the last holder releases it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch


class BlockAllocator:
    """Free list + reference counts over block ids [0, num_blocks). Pure Python, not thread-safe
    (only the engine loop thread uses it)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # A deque gives O(1) pops from the front and pushes at the back: freed blocks are reused last,
        # which keeps recently freed (possibly still cached elsewhere) blocks intact longest.
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, each with reference count 1. The caller checks availability
        first; asking for more than `num_free_blocks` is an internal error."""
        assert num_blocks <= len(self._free), f"asked for {num_blocks} blocks, {len(self._free)} free"
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one holder to each (already allocated) block."""
        for b in block_ids:
            assert self._ref_counts[b] > 0, f"incref of free block {b}"
            self._ref_counts[b] += 1

    def decref(self, block_ids: Iterable[int]) -> int:
        """Drop one holder from each block; blocks reaching zero go back to the free list.
        Returns how many blocks were freed."""
        num_freed = 0
        for b in block_ids:
            assert self._ref_counts[b] > 0, f"double free of block {b}"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)
                num_freed += 1
        return num_freed


class KVCachePool:
    """The KV tensors. `kv[layer]` is [2, num_blocks, block_size, num_kv_heads, head_dim].

    One extra block (id `num_blocks`, never handed out by the allocator) is a scratch target for the
    KV writes of padding rows in captured CUDA graphs.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        # kv: [num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim]
        self.kv = torch.zeros(
            num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    @staticmethod
    def bytes_per_block(
        *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def release(self) -> None:
        """Free the KV tensors (the engine is closing); the pool holds no blocks afterwards."""
        self.kv = self.kv.new_empty((0,))

    def layer(self, index: int) -> torch.Tensor:
        """[2, num_blocks + 1, block_size, num_kv_heads, head_dim] view of one layer's K and V."""
        return self.kv[index]
