"""CUDA graphs for decode steps: one graph per padded batch size, replayed with fresh inputs.

Decode shapes depend only on the batch size once inputs are padded (see `inputs.DecodeBatch`), so a
graph captured per size in {1, 2, 4, 8, 16, 24, 32, ...} serves any batch up to that size; padding rows
read and write the pool's scratch block, never a real one. The wrapper takes tensors only: it copies a
`DecodeBatch` into its static buffers and replays the graph of that size around the forward function
it was given (the runner's eager decode forward, the same code).

Each size's graph bakes in the matrix-product kernels of the BLAS library torch prefers while it is
captured. Which library is faster depends on the shapes: on one H200 (8B shape) cuBLASLt ran the MLP
products faster at 64 rows and cuBLAS the smaller ones and single rows. With `blas="auto"` each size is
captured once per library and the graph that replays faster is kept (interleaved timings, median).
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch

from terse.backend.local.config import CUDA_GRAPH_BLAS
from terse.backend.local.inputs import DecodeBatch
from terse.validation import check_choice

_LIBRARIES = ("cublas", "cublaslt")


@contextmanager
def preferred_blas(library: str) -> Iterator[None]:
    """Make `library` torch's preferred BLAS for matrix products inside the block, then restore it."""
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def fastest(timers: dict[str, Callable[[], float]], rounds: int) -> str:
    """The key whose timer has the lowest median over `rounds` calls, the timers called in turn
    (interleaved, so that drift touches all alike); a tie keeps the earlier key."""
    times: dict[str, list[float]] = {key: [] for key in timers}
    for _ in range(rounds):
        for key, timer in timers.items():
            times[key].append(timer())
    return min(timers, key=lambda key: statistics.median(times[key]))


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 2) -> float:
    """Milliseconds per replay of `graph`, measured on the device."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch_size + 1, 8))
    return sorted({s for s in sizes if s <= max_batch_size} | {max_batch_size})


class DecodeGraphs:
    """Captured decode forwards sharing one set of static input buffers and one memory pool."""

    def __init__(
        self, forward: Callable[[DecodeBatch], torch.Tensor], *, max_batch_size: int, max_blocks_per_seq: int,
        scratch_block: int, block_size: int, device: torch.device, blas: str = "auto", timing_rounds: int = 5,
    ) -> None:
        check_choice("cuda_graph_blas", blas, CUDA_GRAPH_BLAS)
        libraries = _LIBRARIES if blas == "auto" else (blas,)
        self.sizes = graph_batch_sizes(max_batch_size)
        n = max_batch_size
        i64 = torch.int64
        # Capture writes must not touch real blocks: every static row starts on the scratch block.
        self.static = DecodeBatch(
            input_ids=torch.zeros(n, dtype=i64, device=device),
            positions=torch.zeros(n, dtype=i64, device=device),
            slot_mapping=torch.full((n,), scratch_block * block_size, dtype=i64, device=device),
            block_tables=torch.full((n, max_blocks_per_seq), scratch_block, dtype=i64, device=device),
            context_lens=torch.ones(n, dtype=i64, device=device),
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.blas: dict[int, str] = {}
        """The BLAS library each size's graph was captured with."""
        pool = None
        # Collect garbage before capturing and not during it: tensors freed mid-capture (say, of an
        # engine this process closed earlier) would touch the allocator while the stream is captured.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.inference_mode():
                for size in reversed(self.sizes):  # largest first so smaller graphs reuse its memory
                    inputs = self._view(size)
                    captured: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
                    for library in libraries:
                        with preferred_blas(library):
                            forward(inputs)  # warm-up outside capture (kernel compilation, lazy init)
                            torch.cuda.synchronize()
                            graph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(graph, pool=pool):
                                output = forward(inputs)
                        pool = graph.pool()
                        graph.replay()  # the first replay uploads the graph: keep it out of the timings
                        captured[library] = (graph, output)
                    best = libraries[0]
                    if len(captured) > 1:
                        best = fastest({lib: partial(replay_ms, g) for lib, (g, _) in captured.items()},
                                       timing_rounds)
                    self.graphs[size], self.outputs[size] = captured[best]
                    self.blas[size] = best
                    del captured  # the other library's graph and output go back to the pool
        finally:
            if was_enabled:
                gc.enable()
        torch.cuda.synchronize()

    def _view(self, size: int) -> DecodeBatch:
        s = self.static
        return DecodeBatch(s.input_ids[:size], s.positions[:size], s.slot_mapping[:size], s.block_tables[:size],
                           s.context_lens[:size])

    def padded_size(self, batch_size: int) -> int | None:
        """The captured size a batch of `batch_size` rows runs at (None: larger than any graph)."""
        return next((s for s in self.sizes if s >= batch_size), None)

    def run(self, batch: DecodeBatch) -> torch.Tensor:
        """Replay the graph of batch's (padded) size on its inputs. -> hidden states [size, hidden]
        (a static buffer: read it before the next replay)."""
        size = batch.input_ids.shape[0]
        width = batch.block_tables.shape[1]
        s = self.static
        s.input_ids[:size].copy_(batch.input_ids)
        s.positions[:size].copy_(batch.positions)
        s.slot_mapping[:size].copy_(batch.slot_mapping)
        s.context_lens[:size].copy_(batch.context_lens)
        s.block_tables[:size, :width].copy_(batch.block_tables)  # entries past width: stale but valid ids
        self.graphs[size].replay()
        return self.outputs[size]
