"""The paged KV pool and its block allocator.

The pool is one tensor per engine, [num_layers, 2 (K, V), num_blocks + 1, block_size, num_kv_heads,
head_dim]; a sequence's KV lives in the blocks its block table lists. The allocator hands out block
ids and counts references, so a block can be shared by several sequences and the prefix cache at once;
it becomes free again when the last holder releases it.

Memory is taken lazily. On CPU the pool comes from `calloc` (through numpy): the kernel maps zero pages
on first touch, so an idle engine is not resident however large its pool, and the pool still reads as
zeros. The allocator hands out the lowest free block id first, so the pages ever touched stay those of
the most blocks ever in use at once (the high-water mark), not the whole pool. On CUDA the pool is
zero-filled once (device memory is reserved either way; the fill takes milliseconds).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np
import torch

from terse.backend.local.kv_policy import KVCopy
from terse.backend.local.staging import to_device


class BlockAllocator:
    """Free blocks (a min-heap: the lowest id first) + reference counts over block ids [0, num_blocks).
    Pure Python, not thread-safe (only the engine loop thread uses it)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        # Lowest id first, not FIFO: a FIFO list cycles through every block of the pool and so touches
        # every page of a lazily allocated pool; the heap keeps use packed at the low end. Freed blocks
        # hold no cached KV (the prefix cache keeps its own reference), so reusing them first costs nothing.
        self._free: list[int] = list(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        """Take the `num_blocks` lowest free blocks, each with reference count 1. The caller checks
        availability first; asking for more than `num_free_blocks` is an internal error."""
        assert num_blocks <= len(self._free), f"asked for {num_blocks} blocks, {len(self._free)} free"
        blocks = [heapq.heappop(self._free) for _ in range(num_blocks)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one holder to each (already allocated) block."""
        for b in block_ids:
            assert self._ref_counts[b] > 0, f"incref of free block {b}"
            self._ref_counts[b] += 1

    def decref(self, block_ids: Iterable[int]) -> int:
        """Drop one holder from each block; blocks reaching zero become free. Returns how many did."""
        num_freed = 0
        for b in block_ids:
            assert self._ref_counts[b] > 0, f"double free of block {b}"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                heapq.heappush(self._free, b)
                num_freed += 1
        return num_freed


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose CPU pages are mapped only when first written (calloc); on CUDA, torch.zeros."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape, dtype=np.int64))
    raw = np.zeros(numel * itemsize, dtype=np.uint8)  # calloc: untouched pages stay unmapped
    return torch.from_numpy(raw).view(dtype).view(shape)


class KVCachePool:
    """The KV tensors. `kv[layer]` is [2, num_blocks + 1, block_size, num_kv_heads, head_dim].

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
        self.kv = lazy_zeros((num_layers, 2, num_blocks + 1, block_size, num_kv_heads, head_dim), dtype, device)

    @staticmethod
    def bytes_per_block(
        *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def release(self) -> None:
        """Free the KV tensors (the engine is closing); the pool holds no blocks afterwards."""
        self.kv = self.kv.new_empty((0,))

    @torch.inference_mode()
    def apply_copy(self, copy: KVCopy, inv_freq: torch.Tensor) -> None:
        """Write `copy.dst_block_ids` in every layer: V copied, K re-rotated by `copy.rope_shift`
        positions in float32 (angle shift * inv_freq taken in float64), one rounding to the pool dtype.
        inv_freq: [head_dim / 2] float32 RoPE inverse frequencies (scaling applied)."""
        kv, device = self.kv, self.kv.device
        src = to_device(copy.src_block_ids, torch.int64, device)
        dst = to_device(copy.dst_block_ids, torch.int64, device)
        angles = copy.rope_shift * inv_freq.to(device=device, dtype=torch.float64)  # [D / 2], exact at 1e6+
        cos = torch.cat((angles, angles)).cos().float()  # [D]
        sin = torch.cat((angles, angles)).sin().float()
        keys = kv[:, 0, src].float()  # [L, n, bs, KVH, D]
        half = keys.shape[-1] // 2
        rotated = keys * cos + torch.cat((-keys[..., half:], keys[..., :half]), dim=-1) * sin
        kv[:, 0, dst] = rotated.to(kv.dtype)
        kv[:, 1, dst] = kv[:, 1, src]

    def layer(self, index: int) -> torch.Tensor:
        """[2, num_blocks + 1, block_size, num_kv_heads, head_dim] view of one layer's K and V."""
        return self.kv[index]
