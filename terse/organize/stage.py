"""One stage of an organized answer: a batch of chat prompts sent in one `Backend.generate` call, timed.

Skeleton-of-Thought and DAG runs are sequences of stages; the latency of a run on an ideal parallel
backend is the sum over stages of the slowest request of each stage (the critical path), while running
every request one after another would cost the sum of all request latencies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from terse.backend.base import Backend
from terse.backend.types import ZERO_USAGE, Completion, Message, SamplingParams, Usage


@dataclass(frozen=True)
class Stage:
    """The completions of one batched call, in input order, with its timings."""

    name: str
    """What the stage did: "skeleton", "points", "direct", "plan", "wave-2", "synthesis"."""
    completions: tuple[Completion, ...]
    """One completion per prompt, in the order the prompts were given."""
    wall_s: float
    """Seconds from submitting the batch until its last result arrived."""

    @property
    def latency_s(self) -> float:
        """Seconds until the slowest request of the stage finished (this stage's share of the critical path)."""
        return self.wall_s

    @property
    def request_latencies_s(self) -> tuple[float, ...]:
        """Each request's own latency when the backend reports it, else the stage's wall time."""
        return tuple(c.metrics.get("latency", self.wall_s) for c in self.completions)

    @property
    def usage(self) -> Usage:
        """Tokens summed over the stage's completions."""
        return sum((c.usage for c in self.completions), ZERO_USAGE)


def run_stage(
    backend: Backend, name: str, conversations: Sequence[Sequence[Message]], params: SamplingParams
) -> Stage:
    """Render every conversation with the backend's chat template and generate them in one batch."""
    prompts = [backend.render_chat(messages) for messages in conversations]
    start = time.perf_counter()
    completions = backend.generate(prompts, params)
    return Stage(name, tuple(completions), time.perf_counter() - start)


class StagedResult:
    """Cost figures of a run made of stages. Results (frozen dataclasses) inherit it and hold `stages`."""

    stages: tuple[Stage, ...]
    """Every batched call of the run, in order."""

    @property
    def usage(self) -> Usage:
        """Tokens summed over all calls (prompt, cached prompt, completion)."""
        return sum((stage.usage for stage in self.stages), ZERO_USAGE)

    @property
    def critical_path_s(self) -> float:
        """Latency of the stages run one after another, each stage's requests in parallel (each stage
        waits for its slowest request)."""
        return sum(stage.latency_s for stage in self.stages)

    @property
    def sequential_s(self) -> float:
        """Latency if every request of every stage ran alone, one after another (sum of request latencies)."""
        return sum(sum(stage.request_latencies_s) for stage in self.stages)
