"""Launch-free timing of GPU work, for choosing kernel plans the way the engine runs them.

A decode step replays a CUDA graph, where a launch costs the GPU about a microsecond; timed one eager
launch at a time (`triton.testing.do_bench`), a product of a few microseconds measures the Python and
Triton launch path instead (~20 us), and every tile choice looks alike. `graph_ms` captures many calls
back to back in one CUDA graph and times its replays: the time per call is what the kernel costs in a
graph. The calls should rotate over copies of their data larger together than the L2 cache, as a
forward pass reads each layer's weight from memory once (`rotating_copies` says how many).

No triton import: usable from the benchmarks and the plan tuner alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch


def rotating_copies(nbytes: int, device: torch.device, *, most: int = 16) -> int:
    """How many copies of `nbytes` of data make calls read it from memory: enough to exceed twice the
    L2 cache, at most `most`."""
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return max(1, min(most, -(-2 * l2 // max(nbytes, 1))))


def graph_ms(calls: Sequence[Callable[[], Any]], *, min_calls: int = 24, replays: int = 7) -> float:
    """Median milliseconds per call of `calls` (cycled until at least `min_calls` were captured), run
    back to back in one CUDA graph. Each call runs once eagerly first (compilation, lazy allocations
    stay out of the graph). Raises RuntimeError when capture fails (see `launch_free_ms`)."""
    if not calls:
        raise ValueError("graph_ms needs at least one call")
    for call in calls:
        call()
    torch.cuda.synchronize()
    rounds = -(-min_calls // len(calls))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(rounds):
                for call in calls:
                    call()
    except Exception as exc:  # something in the calls cannot be captured (a sync, a host read)
        raise RuntimeError(f"CUDA graph capture failed: {exc}") from exc
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(calls)))
    del graph
    return statistics.median(times)


def eager_ms(calls: Sequence[Callable[[], Any]], *, repeats: int = 20) -> float:
    """Median milliseconds per call launched eagerly back to back (includes launch overhead when the
    calls are shorter than it)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def launch_free_ms(calls: Sequence[Callable[[], Any]]) -> tuple[float, bool]:
    """(ms per call, True) from `graph_ms`; where capture fails, (eager ms, False)."""
    try:
        return graph_ms(calls), True
    except RuntimeError:
        return eager_ms(calls), False
