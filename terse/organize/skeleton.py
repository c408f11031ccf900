"""Skeleton-of-Thought: write a short skeleton, expand every point in parallel, merge in order.

    question ─► router ─┬─ "direct" ───────────────────────────────► one generation ─► answer
                        └─ "sot" ─► skeleton ─► parse ─┬─ None ─────► one generation ─► answer
                                                       └─ points ──► N expansions in ONE batch ─► merge

All N expansion prompts are identical up to "Expand point i in one sentence.", so a prefix-caching
backend prefills documents + question + skeleton once and each expansion only adds a few tokens.
The planning half (prompts, parsing, merging, routing by rules) is pure; `SkeletonOfThought` executes
it through any `Backend`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from terse.backend.base import Backend
from terse.backend.types import Completion, Message, SamplingParams
from terse.errors import ConfigError, InvalidRequestError
from terse.organize.calls import BatchCall, BatchedResult, run_batch_call
from terse.organize.formats import (
    MAX_SKELETON_POINTS,
    MIN_SKELETON_POINTS,
    Context,
    format_skeleton,
    parse_skeleton,
    point_messages,
    qa_messages,
    skeleton_messages,
)
from terse.organize.router import ROUTERS, Mode, Route, Router, make_router


@dataclass(frozen=True)
class SoTConfig:
    """How Skeleton-of-Thought samples and when it gives up on a skeleton."""

    skeleton_params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=128))
    """Sampling of the skeleton (numbered points, one per line)."""
    point_params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=64))
    """Sampling of each point's expansion (one sentence each)."""
    direct_params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=512))
    """Sampling of the direct answer (router says "direct", or the skeleton did not parse)."""
    min_points: int = MIN_SKELETON_POINTS
    """Fewer parsed points than this count as a failed skeleton (falls back to the direct answer)."""
    max_points: int = MAX_SKELETON_POINTS
    """Points beyond this many are dropped before expansion."""
    router: str = "rules"
    """Name of the router in `terse.organize.router.ROUTERS`: "rules", "model", "always-sot", "always-direct"."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_points <= self.max_points:
            raise ConfigError(
                f"min_points={self.min_points}, max_points={self.max_points}: need 1 <= min_points <= "
                f"max_points (defaults {MIN_SKELETON_POINTS} and {MAX_SKELETON_POINTS})"
            )
        if self.router not in ROUTERS:
            raise ConfigError(f"router={self.router!r} is unknown; choose one of {sorted(ROUTERS)}")


@dataclass(frozen=True)
class PointAnswer:
    """One expanded point (or, in direct mode, the whole answer as index 0)."""

    index: int
    """0-based position in the skeleton."""
    point: str
    """The skeleton point's text ("" in direct mode)."""
    expansion: str
    """The model's expansion of the point, stripped (the answer in direct mode)."""
    completion: Completion

    @property
    def text(self) -> str:
        """This point's part of the merged answer."""
        return merge_points([self.point], [self.expansion], start=self.index + 1) if self.point else self.expansion


@dataclass(frozen=True)
class SoTResult(BatchedResult):
    """The outcome of one question: the answer, how it was produced, what it cost."""

    text: str
    """The final answer (merged points, or the direct answer)."""
    mode: Mode
    """"sot" when the skeleton was expanded, "direct" otherwise."""
    reason: str
    """Why that mode: the router's reason, or why the skeleton was rejected."""
    points: tuple[PointAnswer, ...]
    """Expanded points in skeleton order; empty in direct mode."""
    skeleton_text: str
    """The raw skeleton the model wrote ("" when none was asked for)."""
    calls: tuple[BatchCall, ...]
    """Every batched call in order ("skeleton", "points" or "direct")."""


# -- pure planning ----------------------------------------------------------------------------------
def point_conversations(
    question: str, contexts: Sequence[Context], points: Sequence[str]
) -> list[list[Message]]:
    """One expansion conversation per point, in order (they share everything but the last line)."""
    return [point_messages(question, contexts, points, i) for i in range(len(points))]


def merge_points(points: Sequence[str], expansions: Sequence[str], *, start: int = 1) -> str:
    """The merged answer: "1. <point>: <expansion>" per line; a point whose expansion is empty stays bare."""
    if len(points) != len(expansions):
        raise ValueError(f"{len(points)} points but {len(expansions)} expansions; they must pair up")
    lines = []
    for number, (point, expansion) in enumerate(zip(points, expansions), start=start):
        body = f"{point}: {expansion.strip()}" if expansion.strip() else point
        lines.append(f"{number}. {body}")
    return "\n".join(lines)


# -- execution --------------------------------------------------------------------------------------
class SkeletonOfThought:
    """Answers questions with Skeleton-of-Thought on `backend`, routing and falling back as configured.

    `run()` returns a `SoTResult`; `stream()` yields points in order as their expansions finish.
    """

    def __init__(self, backend: Backend, config: SoTConfig | None = None, router: Router | None = None) -> None:
        self.backend = backend
        self.config = config or SoTConfig()
        self.router = router or make_router(self.config.router, backend)

    def run(self, question: str, contexts: Sequence[Context] = ()) -> SoTResult:
        stream = self.stream(question, contexts)
        for _ in stream:
            pass
        return stream.result()

    def stream(
        self, question: str, contexts: Sequence[Context] = (), points: Sequence[str] | None = None
    ) -> SoTStream:
        """An iterator of `PointAnswer`s in skeleton order; `.result()` once it is exhausted.

        With `points`, that skeleton is expanded as given (no routing, no skeleton call).
        """
        return SoTStream(self, question, tuple(contexts), None if points is None else tuple(points))

    def expand(self, question: str, contexts: Sequence[Context], points: Sequence[str]) -> SoTResult:
        """Expand a given skeleton (no routing, no skeleton call): one batch of `len(points)` requests."""
        stream = self.stream(question, contexts, points)
        for _ in stream:
            pass
        return stream.result()


def accept_skeleton(skeleton_text: str, config: SoTConfig) -> tuple[list[str] | None, str]:
    """The points to expand (None to fall back to the direct answer) and why, for a model's skeleton."""
    points = parse_skeleton(skeleton_text, min_points=config.min_points, max_points=config.max_points)
    if points is None:
        return None, f"skeleton did not parse into >= {config.min_points} points ({skeleton_text[:60]!r})"
    return points, f"skeleton has {len(points)} points"


class SoTStream:
    """Iterates one question's points in order as they finish; the work starts on first iteration.

    The expansions are submitted together (one batch) before the first is awaited, so yielding in
    order never delays the others.
    """

    def __init__(
        self,
        sot: SkeletonOfThought,
        question: str,
        contexts: tuple[Context, ...],
        points: tuple[str, ...] | None = None,
    ) -> None:
        if points is not None and not points:
            raise InvalidRequestError("points=() is empty; pass at least one skeleton point to expand")
        self._sot = sot
        self._points = points
        self._question = question
        self._contexts = contexts
        self._result: SoTResult | None = None
        self._started = False

    def __iter__(self) -> Iterator[PointAnswer]:
        if self._started:
            raise RuntimeError("a SoTStream can be iterated once; call SkeletonOfThought.stream() again")
        self._started = True
        return self._generate()

    def result(self) -> SoTResult:
        """The finished result; runs the remaining work first when iteration did not finish."""
        if self._result is None and not self._started:
            for _ in self:
                pass
        if self._result is None:
            raise RuntimeError("the stream was abandoned before it finished; call run() instead")
        return self._result

    def _generate(self) -> Iterator[PointAnswer]:
        sot, config = self._sot, self._sot.config
        if self._points is not None:
            yield from self._expand("given skeleton", None, list(self._points))
            return
        route: Route = sot.router.route(self._question)
        if route.mode == "direct":
            yield from self._direct(route.reason, (), "")
            return
        skeleton = run_batch_call(
            sot.backend, "skeleton", [skeleton_messages(self._question, self._contexts)], config.skeleton_params
        )
        skeleton_text = skeleton.completions[0].text
        points, why = accept_skeleton(skeleton_text, config)
        if points is None:
            yield from self._direct(f"{route.reason}; {why}", (skeleton,), skeleton_text)
            return
        yield from self._expand(f"{route.reason}; {why}", skeleton, points)

    def _expand(self, reason: str, skeleton: BatchCall | None, points: list[str]) -> Iterator[PointAnswer]:
        backend, params = self._sot.backend, self._sot.config.point_params
        conversations = point_conversations(self._question, self._contexts, points)
        start = time.perf_counter()
        handles = [backend.submit(backend.render_chat(c), params) for c in conversations]
        answers: list[PointAnswer] = []
        try:
            for index, (point, handle) in enumerate(zip(points, handles)):
                completion = handle.result()
                answers.append(PointAnswer(index, point, completion.text.strip(), completion))
                yield answers[-1]
        finally:
            for handle in handles[len(answers) :]:  # abandoned mid-way: free the engine
                handle.cancel()
        # A slow consumer between yields must not count as model time: use the backend's own
        # per-request latencies when it reports them.
        completions = tuple(a.completion for a in answers)
        latencies = [c.metrics["latency"] for c in completions if "latency" in c.metrics]
        wall_s = max(latencies) if len(latencies) == len(completions) else time.perf_counter() - start
        points_call = BatchCall("points", completions, wall_s)
        text = merge_points(points, [a.expansion for a in answers])
        skeleton_text = skeleton.completions[0].text if skeleton else format_skeleton(points)
        calls = (skeleton, points_call) if skeleton else (points_call,)
        self._result = SoTResult(text, "sot", reason, tuple(answers), skeleton_text, calls)

    def _direct(self, reason: str, earlier: tuple[BatchCall, ...], skeleton_text: str) -> Iterator[PointAnswer]:
        sot = self._sot
        call = run_batch_call(
            sot.backend, "direct", [qa_messages(self._question, self._contexts)], sot.config.direct_params
        )
        completion = call.completions[0]
        answer = PointAnswer(0, "", completion.text.strip(), completion)
        self._result = SoTResult(answer.expansion, "direct", reason, (), skeleton_text, (*earlier, call))
        yield answer
