"""DAG decomposition: exact graphs and waves from the pure scheduler, execution through the HF backend."""

from __future__ import annotations

import pytest

from terse.backend.base import Backend
from terse.backend.types import SamplingParams
from terse.organize.dag import (
    DagConfig,
    DagDecomposition,
    WaveScheduler,
    accept_plan,
    build_graph,
    critical_path,
    plan_waves,
    step_conversation,
)
from terse.organize.formats import (
    PlanError,
    PlanStep,
    fill_answers,
    parse_plan,
    plan_messages,
    qa_messages,
    synthesis_messages,
)

PLAN = parse_plan(
    "Q1: Who founded Globex?\n"
    "Q2: Where is Acme based?\n"
    "Q3: When was {Q1} born?\n"
    "Q4: Is {Q3} before the year {Q2} was founded? [after Q2, Q3]\n"
    "Q5: What does Acme sell?"
)
assert PLAN is not None
DOCS = [("d1", "Bob founded Globex in 1998.")]
SHORT = SamplingParams(max_tokens=5)
CONFIG = DagConfig(plan_params=SHORT, step_params=SHORT, synthesis_params=SHORT, direct_params=SHORT)


def test_build_graph_has_an_edge_per_dependency() -> None:
    graph = build_graph(PLAN)
    assert sorted(graph.edges) == [(1, 3), (2, 4), (3, 4)]
    assert graph.nodes[4]["step"] == PLAN[3]


def test_waves_run_each_step_as_soon_as_its_inputs_exist() -> None:
    assert plan_waves(build_graph(PLAN)) == [[1, 2, 5], [3], [4]]
    assert critical_path(build_graph(PLAN)) == [1, 3, 4]


def test_waves_keep_written_order_within_a_wave() -> None:
    steps = [PlanStep(3, "c", ()), PlanStep(1, "a", ()), PlanStep(2, "b of {Q3} {Q1}", (1, 3))]
    assert plan_waves(build_graph(steps)) == [[3, 1], [2]]


def test_scheduler_releases_a_step_when_its_own_inputs_are_done() -> None:
    scheduler = WaveScheduler(build_graph(PLAN))
    assert scheduler.next_wave() == [1, 2, 5]
    scheduler.mark_done([1])
    assert scheduler.next_wave() == [3]  # needs only Q1
    scheduler.mark_done([3])
    assert scheduler.next_wave() == []  # Q4 still waits for Q2
    scheduler.mark_done([2, 5])
    assert scheduler.next_wave() == [4]
    assert not scheduler.finished()
    scheduler.mark_done([4])
    assert scheduler.finished()


def test_broken_plans_are_rejected_with_the_reason() -> None:
    with pytest.raises(PlanError, match="cycle"):
        build_graph([PlanStep(1, "a", (2,)), PlanStep(2, "b", (1,))])
    steps, reason = accept_plan("Q1: A? [after Q2]\nQ2: B? [after Q1]", DagConfig())
    assert steps is None and "did not parse, or has a cycle" in reason
    steps, reason = accept_plan("Q1: Who founded Globex?", DagConfig())
    assert steps is None and reason == "plan has 1 step(s), fewer than min_steps=2"
    steps, reason = accept_plan("Q1: A?\nQ2: B of {Q1}?", DagConfig())
    assert steps is not None and reason == "plan has 2 steps"


def test_step_conversation_fills_answers_into_the_qa_format() -> None:
    assert step_conversation(PLAN[2], {1: "Bob"}, DOCS) == qa_messages("When was Bob born?", DOCS)


def _answer(backend: Backend, messages: list) -> str:  # type: ignore[type-arg]
    return backend.generate([backend.render_chat(messages)], SHORT)[0].text.strip()


def test_execute_answers_each_wave_and_substitutes_along_edges(organize_backend: Backend) -> None:
    question = "Is Globex older than its founder?"
    result = DagDecomposition(organize_backend, CONFIG).execute(question, DOCS, PLAN)
    expected: dict[int, str] = {}
    for step_id in (1, 2, 5, 3, 4):  # one step at a time, in dependency order, greedy
        step = PLAN[step_id - 1]
        expected[step_id] = _answer(organize_backend, qa_messages(fill_answers(step.question, expected), DOCS))
    assert result.mode == "dag"
    assert result.waves == ((1, 2, 5), (3,), (4,))
    assert result.answers == expected
    assert result.critical_path_ids == (1, 3, 4)
    final = _answer(organize_backend, synthesis_messages(question, DOCS, [(s, expected[s.step_id]) for s in PLAN]))
    assert result.text == final
    assert [s.name for s in result.calls] == ["wave-1", "wave-2", "wave-3", "synthesis"]
    assert result.usage.completion_tokens == sum(s.usage.completion_tokens for s in result.calls)

    sequential = DagDecomposition(organize_backend, CONFIG).execute(question, DOCS, PLAN, batch_waves=False)
    assert sequential.answers == result.answers and sequential.text == result.text
    assert [s.name for s in sequential.calls] == ["wave-1"] * 3 + ["wave-2", "wave-3", "synthesis"]


def test_unusable_plan_falls_back_to_a_direct_answer(organize_backend: Backend) -> None:
    question = "Where is the company Alice works for based?"
    result = DagDecomposition(organize_backend, CONFIG).run(question, DOCS)
    plan = organize_backend.generate([organize_backend.render_chat(plan_messages(question, DOCS))], SHORT)[0]
    assert result.plan_text == plan.text  # five random tokens are no plan
    assert result.mode == "direct" and "did not parse" in result.reason
    assert result.text == _answer(organize_backend, qa_messages(question, DOCS))
    assert [s.name for s in result.calls] == ["plan", "direct"]
    assert result.steps == () and result.waves == ()
