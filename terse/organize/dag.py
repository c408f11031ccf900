"""DAG decomposition: plan sub-questions with dependencies, answer them in waves, then synthesize.

    question ─► plan ─► parse + validate ─┬─ broken / too small ─────────────► one generation ─► answer
                                          └─ DiGraph ─► wave 1 ─► wave 2 ─► … ─► synthesis ─► answer

A wave holds every step whose inputs are all answered; its steps go to the backend in ONE generate
call. A step's "{Qi}" placeholders are filled with the answers flowing along its in-edges. Example:

    Q1: Who founded Globex?            wave 1: [Q1, Q2]
    Q2: Where is Acme based?           wave 2: [Q3]
    Q3: When was {Q1} born? [after Q1] critical path: Q1 -> Q3 (2 steps instead of 3 sequential)

The scheduler and graph building are pure; `DagDecomposition` executes them through any `Backend`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx

from terse.backend.base import Backend
from terse.backend.types import Message, SamplingParams
from terse.errors import ConfigError
from terse.organize.calls import BatchCall, BatchedResult, run_batch_call
from terse.organize.formats import (
    MAX_PLAN_STEPS,
    Context,
    PlanStep,
    check_plan,
    fill_answers,
    parse_plan,
    plan_messages,
    qa_messages,
    synthesis_messages,
)


@dataclass(frozen=True)
class DagConfig:
    """How `DagDecomposition` samples each kind of call and which plans it accepts."""

    plan_params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=192))
    """Sampling of the plan ("Qn: ..." lines)."""
    step_params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=48))
    """Sampling of each sub-question's answer (a bare answer)."""
    synthesis_params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=128))
    """Sampling of the final answer from the sub-answers."""
    direct_params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=256))
    """Sampling of the direct answer used when the plan is rejected."""
    min_steps: int = 2
    """Plans with fewer steps fall back to the direct answer (one step only adds calls)."""
    max_steps: int = MAX_PLAN_STEPS
    """Plans with more steps are rejected (falls back to the direct answer)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(
                f"min_steps={self.min_steps}, max_steps={self.max_steps}: need 1 <= min_steps <= max_steps"
            )


# -- pure planning ----------------------------------------------------------------------------------
def build_graph(steps: Sequence[PlanStep]) -> nx.DiGraph:
    """The plan as a DiGraph: one node per step id (attributes "step" and "order"), an edge Qi -> Qj
    when Qj needs Qi's answer. Raises `PlanError` (via `check_plan`) for a broken plan."""
    check_plan(steps, max_steps=max(len(steps), 1))
    graph = nx.DiGraph()
    for order, step in enumerate(steps):
        graph.add_node(step.step_id, step=step, order=order)
    for step in steps:
        graph.add_edges_from((dep, step.step_id) for dep in step.dependency_ids)
    return graph


class WaveScheduler:
    """Hands out waves of runnable steps: a step becomes ready once all its predecessors are done.

    `next_wave()` returns every ready step not yet handed out (in written order) and `mark_done()`
    records answered ones. Steps handed out but not marked done block their successors.
    """

    def __init__(self, graph: nx.DiGraph) -> None:
        self._graph = graph
        self._done: set[int] = set()
        self._started: set[int] = set()

    def finished(self) -> bool:
        return len(self._done) == self._graph.number_of_nodes()

    def next_wave(self) -> list[int]:
        ready = [
            node
            for node in self._graph.nodes
            if node not in self._started and all(p in self._done for p in self._graph.predecessors(node))
        ]
        ready.sort(key=lambda node: self._graph.nodes[node]["order"])
        self._started.update(ready)
        return ready

    def mark_done(self, step_ids: Sequence[int]) -> None:
        unknown = [i for i in step_ids if i not in self._started]
        assert not unknown, f"steps {unknown} were marked done before being handed out"
        self._done.update(step_ids)


def plan_waves(graph: nx.DiGraph) -> list[list[int]]:
    """All waves of a plan, as executed when each wave completes before the next is asked for."""
    scheduler = WaveScheduler(graph)
    waves = []
    while not scheduler.finished():
        wave = scheduler.next_wave()
        assert wave, "a validated acyclic plan always has a ready step"
        scheduler.mark_done(wave)
        waves.append(wave)
    return waves


def critical_path(graph: nx.DiGraph) -> list[int]:
    """The longest dependency chain (step ids): the steps no schedule can run side by side."""
    path: list[int] = nx.dag_longest_path(graph)
    return path


def accept_plan(plan_text: str, config: DagConfig) -> tuple[list[PlanStep] | None, str]:
    """The steps to run (None to fall back to the direct answer) and why, for a model's plan."""
    steps = parse_plan(plan_text, max_steps=config.max_steps)
    if steps is None:
        return None, f"plan did not parse, or has a cycle, a dangling reference or > {config.max_steps} steps"
    if len(steps) < config.min_steps:
        return None, f"plan has {len(steps)} step(s), fewer than min_steps={config.min_steps}"
    return steps, f"plan has {len(steps)} steps"


def step_conversation(step: PlanStep, answers: dict[int, str], contexts: Sequence[Context]) -> list[Message]:
    """The QA conversation answering `step`, its "{Qi}" placeholders filled from `answers`."""
    return qa_messages(fill_answers(step.question, answers), contexts)


# -- execution --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DagResult(BatchedResult):
    """One question answered through a plan (or directly, when the plan was unusable)."""

    text: str
    """The final answer (synthesis, or the direct answer)."""
    mode: Literal["dag", "direct"]
    """"dag" when the plan ran, "direct" after a fallback."""
    reason: str
    """Why that mode (the plan's shape, or why it was rejected)."""
    plan_text: str
    """The plan as the model wrote it."""
    steps: tuple[PlanStep, ...]
    """The parsed plan in written order (empty after a fallback)."""
    waves: tuple[tuple[int, ...], ...]
    """Step ids per wave in execution order."""
    answers: dict[int, str]
    """Each step's answer by step id."""
    critical_path_ids: tuple[int, ...]
    """The longest dependency chain of the plan."""
    calls: tuple[BatchCall, ...]
    """Every batched call in order: "plan", "wave-1", ..., "synthesis" (or "direct")."""


class DagDecomposition:
    """Answers questions by planning sub-questions and running the plan's waves on `backend`."""

    def __init__(self, backend: Backend, config: DagConfig | None = None) -> None:
        self.backend = backend
        self.config = config or DagConfig()

    def run(self, question: str, contexts: Sequence[Context] = ()) -> DagResult:
        """Plan, validate, run the waves and synthesize; a broken or too small plan falls back to a
        direct answer (never an empty result because of the plan)."""
        config = self.config
        plan = run_batch_call(self.backend, "plan", [plan_messages(question, contexts)], config.plan_params)
        steps, why = accept_plan(plan.completions[0].text, config)
        if steps is None:
            return self._direct(question, contexts, plan, why)
        return self.execute(question, contexts, steps, plan=plan)

    def execute(
        self,
        question: str,
        contexts: Sequence[Context],
        steps: Sequence[PlanStep],
        *,
        plan: BatchCall | None = None,
        batch_waves: bool = True,
    ) -> DagResult:
        """Run a given plan. `batch_waves=False` sends one step per call in wave order: the
        sequential baseline benchmarks compare against. Raises `PlanError` for a broken plan."""
        graph = build_graph(steps)
        answers: dict[int, str] = {}
        made = [plan] if plan is not None else []
        scheduler = WaveScheduler(graph)
        waves: list[tuple[int, ...]] = []
        while not scheduler.finished():
            wave = scheduler.next_wave()
            groups = [wave] if batch_waves else [[i] for i in wave]
            for group in groups:
                conversations = [step_conversation(graph.nodes[i]["step"], answers, contexts) for i in group]
                call = run_batch_call(self.backend, f"wave-{len(waves) + 1}", conversations, self.config.step_params)
                answers.update((i, c.text.strip()) for i, c in zip(group, call.completions))
                made.append(call)
            scheduler.mark_done(wave)
            waves.append(tuple(wave))
        synthesis = run_batch_call(
            self.backend,
            "synthesis",
            [synthesis_messages(question, contexts, [(s, answers[s.step_id]) for s in steps])],
            self.config.synthesis_params,
        )
        made.append(synthesis)
        path = tuple(critical_path(graph))
        reason = f"{len(steps)} steps in {len(waves)} waves (critical path {len(path)})"
        return DagResult(
            synthesis.completions[0].text.strip(), "dag", reason, plan.completions[0].text if plan else "",
            tuple(steps), tuple(waves), answers, path, tuple(made),
        )

    def _direct(self, question: str, contexts: Sequence[Context], plan: BatchCall, reason: str) -> DagResult:
        call = run_batch_call(self.backend, "direct", [qa_messages(question, contexts)], self.config.direct_params)
        text = call.completions[0].text.strip()
        return DagResult(text, "direct", reason, plan.completions[0].text, (), (), {}, (), (plan, call))
