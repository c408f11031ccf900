"""CUDA graphs for decode steps: one graph per padded batch size, replayed with fresh inputs.

Decode shapes depend only on the batch size once inputs are padded (see `inputs.DecodeBatch`), so a
graph captured per size in {1, 2, 4, 8, 16, 24, 32, ...} serves any batch up to that size; padding rows
read and write the pool's scratch block, never a real one. The wrapper takes tensors only: the runner
copies a step's inputs straight into the static input buffer (one host -> device copy in the layout of
`inputs.DecodeLayout`; for long contexts at large batches, at the batch's table width and spread there,
see `runner.FULL_WIDTH_COPY_BYTES`) and the wrapper replays the graph of that size around the functions it
was given (the runner's eager decode forward, the same code, and the model's LM head on the graph's rows).

Each size's graph bakes in the matrix-product kernels of the BLAS library torch prefers while it is
captured. Which library is faster depends on the shapes: on one H200 (8B shape) cuBLASLt ran the MLP
products faster at 64 rows and cuBLAS the smaller ones and single rows. With `blas="auto"` each size is
captured once per library and the graph that replays faster is kept (interleaved timings, median).
The LM head is captured under the library an eager call would use, so a dense head's logits are those of
the eager head on the same rows (an INT4 head of one row takes the final norm's row prep in the graph,
terse.kernels.row_prep: the same product up to float32 rounding).

Only the graphs of up to `HEAD_MAX_SIZE` rows run the LM head: their logits serve when every row samples
(a batch of one, say), and their outputs stay small. Every size keeps its outputs in the graphs' pool;
logits [size, vocab] in every size up to 256 (4,231 rows) would hold about 1.1 GB in bfloat16 at a 128K
vocabulary, against 15 rows (~4 MB) this way. Larger batches run the head after the replay, on the rows
that sample, as eager steps do.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple

import torch

from terse.backend.local.config import CUDA_GRAPH_BLAS
from terse.backend.local.inputs import DecodeBatch, DecodeLayout
from terse.validation import check_choice

_LIBRARIES = ("cublas", "cublaslt")


@contextmanager
def preferred_blas(library: str | torch._C._BlasBackend) -> Iterator[None]:
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


class DecodeOutputs(NamedTuple):
    """A graph's outputs: static buffers, overwritten by its next replay (read them, or queue
    the kernels that do, before it)."""

    hidden: torch.Tensor
    """[size, hidden]: the final hidden states."""
    logits: torch.Tensor | None
    """[size, vocab] in the model dtype: `head(hidden)` of all `size` rows (None past `HEAD_MAX_SIZE`)."""


HEAD_MAX_SIZE = 8
"""The largest graph size that runs the LM head in its replay."""


class DecodeGraphs:
    """Captured decode forwards (the decoder and the LM head) sharing one static input buffer and one
    memory pool.

    The static inputs are one flat int64 buffer; the graph of size s reads its first
    `DecodeLayout(s, max_blocks_per_seq).num_elements` entries as that layout (inputs.py), so a step's
    inputs land with one host -> device copy (`prepare_decode(..., dest=graphs.static_inputs(size))`)
    and the replay needs no copy of its own. The sizes' inputs alias the same memory: each step writes its whole
    layout before its replay, and that copy is ordered on the stream after the previous replay.
    """

    def __init__(
        self, forward: Callable[[DecodeBatch], torch.Tensor], head: Callable[[torch.Tensor], torch.Tensor], *,
        max_batch_size: int, max_blocks_per_seq: int, scratch_block: int, block_size: int, device: torch.device,
        blas: str = "auto", timing_rounds: int = 5,
    ) -> None:
        """forward: a decode batch -> hidden [size, hidden]; head: hidden -> logits [size, vocab]. The
        forward is captured under each candidate BLAS library (`blas`), the head under the library in effect
        here, the one an eager call of it would use."""
        check_choice("cuda_graph_blas", blas, CUDA_GRAPH_BLAS)
        libraries = _LIBRARIES if blas == "auto" else (blas,)
        head_library = torch.backends.cuda.preferred_blas_library()
        self.sizes = graph_batch_sizes(max_batch_size)
        self.width = max_blocks_per_seq
        """Block-table entries per row of the static inputs."""
        self.scratch_block, self.block_size = scratch_block, block_size
        self._inputs = torch.empty(self.layout(max_batch_size).num_elements, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, DecodeOutputs] = {}
        self.blas: dict[int, str] = {}
        """The BLAS library each size's graph was captured with (its forward; the head keeps the default)."""

        def step(inputs: DecodeBatch) -> DecodeOutputs:
            hidden = forward(inputs)
            if hidden.shape[0] > HEAD_MAX_SIZE:
                return DecodeOutputs(hidden, None)
            with preferred_blas(head_library):
                return DecodeOutputs(hidden, head(hidden))

        pool = None
        # Collect garbage before capturing and not during it: tensors freed mid-capture (say, of an
        # engine this process closed earlier) would touch the allocator while the stream is captured.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.inference_mode():
                for size in reversed(self.sizes):  # largest first so smaller graphs reuse its memory
                    inputs = self.pad(size)
                    captured: dict[str, tuple[torch.cuda.CUDAGraph, DecodeOutputs]] = {}
                    for library in libraries:
                        with preferred_blas(library):
                            step(inputs)  # warm-up outside capture (kernel compilation, lazy init, plans)
                            torch.cuda.synchronize()
                            graph = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(graph, pool=pool):
                                output = step(inputs)
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

    def layout(self, size: int) -> DecodeLayout:
        """The layout of the graph of `size`'s inputs (fill a host buffer of it for `static_inputs`)."""
        return DecodeLayout(size, self.width)

    def static_inputs(self, size: int) -> torch.Tensor:
        """[layout(size).num_elements] int64: where the graph of `size` reads its inputs."""
        return self._inputs[: self.layout(size).num_elements]

    def inputs(self, size: int) -> DecodeBatch:
        """The graph of `size`'s inputs as `DecodeBatch` views of the static buffer."""
        return self.layout(size).views(self._inputs)

    def pad(self, size: int) -> DecodeBatch:
        """Fill the inputs of `size` with padding rows only (each on the scratch block: a replay writes no
        real block) and return them."""
        inputs = self.inputs(size)
        inputs.input_ids.zero_()
        inputs.positions.zero_()
        inputs.slot_mapping.fill_(self.scratch_block * self.block_size)
        inputs.block_tables.fill_(self.scratch_block)
        inputs.context_lens.fill_(1)
        return inputs

    def padded_size(self, batch_size: int) -> int | None:
        """The captured size a batch of `batch_size` rows runs at (None: larger than any graph)."""
        return next((s for s in self.sizes if s >= batch_size), None)

    def run(self, size: int) -> DecodeOutputs:
        """Replay the graph of `size` on its static inputs (written before: see `static_inputs`)."""
        self.graphs[size].replay()
        return self.outputs[size]
