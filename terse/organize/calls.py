"""One batched call of an organized answer: a batch of chat prompts sent in one `Backend.generate`, timed.

Skeleton-of-Thought and DAG runs are sequences of batched calls; the latency of a run on an ideal
parallel backend is the sum over calls of the slowest request of each call (the critical path), while
running every request one after another would cost the sum of all request latencies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from terse.backend.base import Backend
from terse.backend.types import ZERO_USAGE, Completion, Message, SamplingParams, Usage


@dataclass(frozen=True)
class BatchCall:
    """The completions of one batched call, in input order, with its timings."""

    name: str
    """What the call did: "skeleton", "points", "direct", "plan", "wave-2", "synthesis"."""
    completions: tuple[Completion, ...]
    """One completion per prompt, in the order the prompts were given."""
    wall_s: float
    """Seconds from submitting the batch until its last result arrived."""

    @property
    def latency_s(self) -> float:
        """Seconds until the slowest request of the call finished (this call's share of the critical path)."""
        return self.wall_s

    @property
    def request_latencies_s(self) -> tuple[float, ...]:
        """Each request's own latency when the backend reports it, else the call's wall time."""
        return tuple(c.metrics.get("latency", self.wall_s) for c in self.completions)

    @property
    def usage(self) -> Usage:
        """Tokens summed over the call's completions."""
        return sum((c.usage for c in self.completions), ZERO_USAGE)


def run_batch_call(
    backend: Backend, name: str, conversations: Sequence[Sequence[Message]], params: SamplingParams
) -> BatchCall:
    """Render every conversation with the backend's chat template and generate them in one batch."""
    prompts = [backend.render_chat(messages) for messages in conversations]
    start = time.perf_counter()
    completions = backend.generate(prompts, params)
    return BatchCall(name, tuple(completions), time.perf_counter() - start)


class BatchedResult:
    """Cost figures of a run made of batched calls. Results (frozen dataclasses) inherit it and hold `calls`."""

    calls: tuple[BatchCall, ...]
    """Every batched call of the run, in order."""

    @property
    def usage(self) -> Usage:
        """Tokens summed over all calls (prompt, cached prompt, completion)."""
        return sum((call.usage for call in self.calls), ZERO_USAGE)

    @property
    def critical_path_s(self) -> float:
        """Latency of the calls made one after another, each call's requests in parallel (each call
        waits for its slowest request)."""
        return sum(call.latency_s for call in self.calls)

    @property
    def sequential_s(self) -> float:
        """Latency if every request of every call ran alone, one after another (sum of request latencies)."""
        return sum(sum(call.request_latencies_s) for call in self.calls)
