"""Dispatch: how prepared questions reach the backend. One contract, three implementations.

`Dispatch.run(batch)` answers a batch and returns one outcome per question, in batch order: a
`Generated` answer or a `FailureRecord`. A failing question never fails the batch.

- `BatchDispatch`: submits the whole batch before waiting (a batching engine runs it as one batch and
  a prefix cache prefills the shared documents once). For `local:` and `hf:`.
- `AsyncDispatch`: one asyncio loop, at most `concurrency` requests in flight and at most
  `requests_per_s` started per second. For remote `openai:` servers.
- `OrganizedDispatch`: Skeleton-of-Thought or DAG per question (terse.organize), each internally batched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from terse.backend.base import Backend
from terse.backend.handle import RequestHandle
from terse.backend.types import SamplingParams, Usage
from terse.errors import BackendUnavailableError, ConfigError
from terse.pipelines.docqa.config import OrganizeConfig, RunConfig
from terse.pipelines.docqa.prepare import PreparedQuestion
from terse.pipelines.docqa.records import FailureRecord


@dataclass(frozen=True)
class Generated:
    """The raw answer of one question."""

    prepared: PreparedQuestion
    text: str
    usage: Usage
    """Summed over every request the answer took."""
    latency_s: float


Outcome = Generated | FailureRecord


class Started(NamedTuple):
    """One question submitted by `BatchDispatch.start`: its handle (or the error submitting raised)."""

    prepared: PreparedQuestion
    handle: RequestHandle | BaseException
    submitted_at: float


class Dispatch(Protocol):
    """Answers batches. `run` returns one outcome per input, in input order, and does not raise for a
    question's own failure (bad request, unreachable server): that becomes its `FailureRecord`."""

    def run(self, batch: Sequence[PreparedQuestion]) -> list[Outcome]: ...


def failure(question_id: str, error: BaseException) -> FailureRecord:
    message = str(error) or repr(error)
    return FailureRecord(question_id, type(error).__name__, message,
                         backend_unavailable=isinstance(error, BackendUnavailableError))


class BatchDispatch:
    """Submit every prompt of the batch, then wait for each (see module docstring).

    `start` and `finish` split `run` in two, so a job can submit batch N+1 while batch N is still
    generating (a batching engine then runs both in the same steps) and collect batch N's answers
    in order afterwards."""

    def __init__(self, backend: Backend, params: SamplingParams) -> None:
        self.backend = backend
        self.params = params

    def run(self, batch: Sequence[PreparedQuestion]) -> list[Outcome]:
        return self.finish(self.start(batch))

    def start(self, batch: Sequence[PreparedQuestion]) -> list[Started]:
        """Submit every prompt of `batch`; a prompt the backend refuses becomes that question's error."""
        started: list[Started] = []
        for p in batch:
            t0 = time.perf_counter()
            try:
                started.append(Started(p, self.backend.submit(p.prompt, self.params), t0))
            except Exception as e:  # an invalid request fails that question only
                started.append(Started(p, e, t0))
        return started

    def finish(self, started: Sequence[Started]) -> list[Outcome]:
        """Wait for each submitted question of one `start` call; one outcome each, in order."""
        outcomes: list[Outcome] = []
        for p, handle, t0 in started:
            if isinstance(handle, BaseException):
                outcomes.append(failure(p.record.id, handle))
                continue
            try:
                completion = handle.result()
            except Exception as e:
                outcomes.append(failure(p.record.id, e))
                continue
            latency = completion.metrics.get("latency", time.perf_counter() - t0)
            outcomes.append(Generated(p, completion.text.strip(), completion.usage, latency))
        return outcomes

    @staticmethod
    def cancel(started: Sequence[Started]) -> None:
        """Cancel what a `start` call submitted and nobody will collect (a job stopping early)."""
        for item in started:
            if isinstance(item.handle, RequestHandle):
                item.handle.cancel()


class AsyncDispatch:
    """Bounded-concurrency, rate-limited asyncio dispatch (see module docstring)."""

    def __init__(self, backend: Backend, params: SamplingParams, config: RunConfig) -> None:
        self.backend = backend
        self.params = params
        self.concurrency = config.concurrency
        self.min_interval_s = 1.0 / config.requests_per_s if config.requests_per_s else 0.0

    def run(self, batch: Sequence[PreparedQuestion]) -> list[Outcome]:
        return asyncio.run(self._run_all(batch))

    async def _run_all(self, batch: Sequence[PreparedQuestion]) -> list[Outcome]:
        semaphore = asyncio.Semaphore(self.concurrency)
        pacing = _Pacer(self.min_interval_s)
        return list(await asyncio.gather(*(self._one(p, semaphore, pacing) for p in batch)))

    async def _one(self, p: PreparedQuestion, semaphore: asyncio.Semaphore, pacing: _Pacer) -> Outcome:
        async with semaphore:
            await pacing.wait()
            t0 = time.perf_counter()
            try:
                completion = await self.backend.submit(p.prompt, self.params)
            except Exception as e:
                return failure(p.record.id, e)
            return Generated(p, completion.text.strip(), completion.usage, time.perf_counter() - t0)


class _Pacer:
    """Spaces request starts at least `min_interval_s` apart (a rate limit without bursts)."""

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self._next_start = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        if self.min_interval_s <= 0:
            return
        async with self._lock:
            now = time.monotonic()
            delay = self._next_start - now
            self._next_start = max(now, self._next_start) + self.min_interval_s
        if delay > 0:
            await asyncio.sleep(delay)


class OrganizedDispatch:
    """Answers each question with Skeleton-of-Thought or a DAG plan (terse.organize)."""

    def __init__(self, backend: Backend, params: SamplingParams, config: OrganizeConfig) -> None:
        self._answer = _organizer(backend, params, config)

    def run(self, batch: Sequence[PreparedQuestion]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for p in batch:
            t0 = time.perf_counter()
            try:
                result = self._answer(p.record.question, p.contexts)
            except Exception as e:
                outcomes.append(failure(p.record.id, e))
                continue
            outcomes.append(Generated(p, result.text.strip(), result.usage, time.perf_counter() - t0))
        return outcomes


def _organizer(backend: Backend, params: SamplingParams, config: OrganizeConfig) -> Callable[..., Any]:
    if config.mode == "dag":
        from terse.organize.dag import DagConfig, DagDecomposition

        return DagDecomposition(backend, DagConfig()).run
    from terse.organize.skeleton import SkeletonOfThought, SoTConfig

    router = "always-sot" if config.mode == "sot" else "rules"
    return SkeletonOfThought(backend, SoTConfig(direct_params=params, router=router)).run


def build_dispatch(backend: Backend, spec: str, params: SamplingParams, run: RunConfig,
                 organize: OrganizeConfig) -> Dispatch:
    """The dispatch a job's config asks for ("auto": async for openai: specs, batch otherwise)."""
    if organize.mode != "off":
        return OrganizedDispatch(backend, params, organize)
    name = run.dispatch
    if name == "auto":
        name = "async" if spec.startswith("openai:") else "batch"
    if name == "batch":
        return BatchDispatch(backend, params)
    if name == "async":
        return AsyncDispatch(backend, params, run)
    raise ConfigError(f"run.dispatch={name!r} must be 'auto', 'batch' or 'async'")
