"""CUDA graphs for decode steps: one graph per padded batch size, replayed with fresh inputs.

Decode shapes depend only on the batch size once block tables are padded to `max_blocks_per_seq`, so
a graph captured per size in {1, 2, 4, 8, 16, 24, 32, ...} serves any batch up to that size; padding
rows read and write the pool's scratch block, never a real one.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import torch

from terse.backend.local.attention import AttentionMetadata
from terse.backend.local.sequence import Sequence

if TYPE_CHECKING:
    from terse.backend.local.runner import ModelRunner


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch_size + 1, 8))
    return sorted({s for s in sizes if s <= max_batch_size} | {max_batch_size})


class DecodeGraphs:
    """Captured decode forwards sharing one set of static input buffers and one memory pool."""

    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        self.runner = runner
        self.sizes = graph_batch_sizes(max_batch_size)
        n, nb, dev = max_batch_size, runner.max_blocks_per_seq, runner.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        scratch_slot = runner.pool.scratch_block * runner.block_size  # capture writes must not touch real blocks
        self.slots = torch.full((n,), scratch_slot, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((n, nb), runner.pool.scratch_block, dtype=torch.int64, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(n, runner.model.config.hidden_size, dtype=runner.pool.kv.dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        # Collect garbage before capturing and not during it: tensors freed mid-capture (say, of an
        # engine this process closed earlier) would touch the allocator while the stream is captured.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.inference_mode():
                for size in reversed(self.sizes):  # largest first so smaller graphs reuse its memory
                    graph = torch.cuda.CUDAGraph()
                    self._forward(size)  # warm-up outside capture (kernel selection, lazy init)
                    torch.cuda.synchronize()
                    with torch.cuda.graph(graph, pool=pool):
                        self._forward(size)
                    pool = graph.pool()
                    self.graphs[size] = graph
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize()

    def _forward(self, size: int) -> None:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:size],
            num_decode_tokens=size,
            decode_block_tables=self.block_tables[:size],
            decode_context_lens=self.context_lens[:size],
            use_triton_decode=self.runner.use_triton_decode,
        )
        r = self.runner
        self.hidden[:size] = r.model(self.input_ids[:size], self.positions[:size], r.pool, meta)

    def fits(self, batch_size: int) -> bool:
        return 0 < batch_size <= self.sizes[-1]

    def run(self, seqs: list[Sequence], input_ids: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Replay the smallest graph holding len(seqs) rows; returns hidden states [len(seqs), hidden]."""
        num = len(seqs)
        size = next(s for s in self.sizes if s >= num)
        r = self.runner
        scratch_slot = r.pool.scratch_block * r.block_size
        pad = size - num
        self.input_ids[:size].copy_(r._tensor(input_ids + [0] * pad))
        self.positions[:size].copy_(r._tensor(positions + [0] * pad))
        self.slots[:size].copy_(r._tensor(slots + [scratch_slot] * pad))
        self.context_lens[:size].copy_(r._tensor([s.num_kv_tokens + 1 for s in seqs] + [1] * pad, torch.int32))
        self.block_tables[:size].fill_(r.pool.scratch_block)
        width = max(len(s.block_table) for s in seqs)
        self.block_tables[:num, :width].copy_(r.padded_tables(seqs, width))
        self.graphs[size].replay()
        return self.hidden[:num]
