"""Skeleton-of-Thought: pure planning exactly, execution on a tiny random model through the HF backend."""

from __future__ import annotations

import pytest

from terse.backend.base import Backend
from terse.backend.types import SamplingParams
from terse.errors import ConfigError, InvalidRequestError
from terse.organize.formats import format_skeleton, point_messages, qa_messages, skeleton_messages
from terse.organize.skeleton import (
    SkeletonOfThought,
    SoTConfig,
    accept_skeleton,
    merge_points,
    point_conversations,
)

DOCS = [("d1", "Bread needs flour, water, salt and yeast.")]
POINTS = ["Mix the dough", "Let it rise", "Bake it"]
SHORT = SamplingParams(max_tokens=6)
CONFIG = SoTConfig(skeleton_params=SHORT, point_params=SHORT, direct_params=SHORT)


# -- pure planning ----------------------------------------------------------------------------------
def test_merge_points_numbers_in_order_and_keeps_bare_points() -> None:
    merged = merge_points(POINTS, [" Combine everything. ", "", "Bake at 230 C."])
    assert merged == "1. Mix the dough: Combine everything.\n2. Let it rise\n3. Bake it: Bake at 230 C."
    with pytest.raises(ValueError, match="3 points but 2 expansions"):
        merge_points(POINTS, ["a", "b"])


def test_point_conversations_share_everything_but_the_last_line() -> None:
    convs = point_conversations("How to bake bread?", DOCS, POINTS)
    assert convs == [point_messages("How to bake bread?", DOCS, POINTS, i) for i in range(3)]
    users = [c[1]["content"] for c in convs]
    shared = users[0].rsplit("\n\n", 1)[0]
    assert all(u.startswith(shared + "\n\nExpand point ") for u in users)


def test_accept_skeleton_returns_points_or_the_reason_to_fall_back() -> None:
    assert accept_skeleton("1. a\n2. b", SoTConfig()) == (["a", "b"], "skeleton has 2 points")
    points, reason = accept_skeleton("I think the answer is 4.", SoTConfig())
    assert points is None and "did not parse into >= 2 points" in reason
    assert accept_skeleton("1. a\n2. b\n3. c", SoTConfig(min_points=4))[0] is None
    assert accept_skeleton("- a\n- b\n- c", SoTConfig(max_points=2))[0] == ["a", "b"]


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="min_points=5, max_points=3"):
        SoTConfig(min_points=5, max_points=3)
    with pytest.raises(ConfigError, match="router='nope' is unknown"):
        SoTConfig(router="nope")


# -- execution ----------------------------------------------------------------------------------------
def test_expand_runs_every_point_and_merges_in_order(organize_backend: Backend) -> None:
    result = SkeletonOfThought(organize_backend, CONFIG).expand("How to bake bread?", DOCS, POINTS)
    prompts = [organize_backend.render_chat(c) for c in point_conversations("How to bake bread?", DOCS, POINTS)]
    expected = [organize_backend.generate([p], SHORT)[0] for p in prompts]  # one at a time, greedy
    assert result.mode == "sot" and result.reason == "given skeleton"
    assert [p.point for p in result.points] == POINTS
    assert [p.completion.token_ids for p in result.points] == [c.token_ids for c in expected]
    assert result.text == merge_points(POINTS, [c.text for c in expected])
    assert result.skeleton_text == format_skeleton(POINTS)
    assert [s.name for s in result.calls] == ["points"]
    assert result.usage.prompt_tokens == sum(c.usage.prompt_tokens for c in expected)
    assert result.usage.completion_tokens == sum(c.usage.completion_tokens for c in expected)
    assert 0 < result.critical_path_s <= result.sequential_s + 1e-9


def test_stream_yields_points_in_order_then_the_result(organize_backend: Backend) -> None:
    sot = SkeletonOfThought(organize_backend, CONFIG)
    stream = sot.stream("How to bake bread?", DOCS, POINTS)  # the random model writes no skeleton
    seen = [p.index for p in stream]
    assert seen == [0, 1, 2]
    assert stream.result().text.startswith("1. Mix the dough")
    with pytest.raises(RuntimeError, match="iterated once"):
        iter(stream)


def test_unparsable_skeleton_falls_back_to_the_direct_answer(organize_backend: Backend) -> None:
    config = SoTConfig(skeleton_params=SHORT, point_params=SHORT, direct_params=SHORT, router="always-sot")
    result = SkeletonOfThought(organize_backend, config).run("What are the steps to bake bread?", DOCS)
    question = "What are the steps to bake bread?"
    skeleton = organize_backend.generate([organize_backend.render_chat(skeleton_messages(question, DOCS))], SHORT)[0]
    direct = organize_backend.generate([organize_backend.render_chat(qa_messages(question, DOCS))], SHORT)[0]
    assert result.skeleton_text == skeleton.text  # six random tokens never form two numbered points
    assert result.mode == "direct"
    assert "fixed: sot; skeleton did not parse" in result.reason
    assert result.text == direct.text.strip()
    assert [s.name for s in result.calls] == ["skeleton", "direct"]
    assert result.points == ()
    assert result.usage.completion_tokens == skeleton.usage.completion_tokens + direct.usage.completion_tokens


def test_router_direct_skips_the_skeleton(organize_backend: Backend) -> None:
    result = SkeletonOfThought(organize_backend, CONFIG).run("Who founded Globex?")
    assert result.mode == "direct" and result.reason == "rule: asks for a single fact"
    assert [s.name for s in result.calls] == ["direct"]
    assert result.skeleton_text == ""


def test_expand_needs_points(organize_backend: Backend) -> None:
    with pytest.raises(InvalidRequestError, match="points=\\(\\) is empty"):
        SkeletonOfThought(organize_backend, CONFIG).expand("How?", (), [])


def test_abandoned_stream_cancels_the_rest_and_has_no_result(organize_backend: Backend) -> None:
    stream = SkeletonOfThought(organize_backend, CONFIG).stream("How to bake bread?", DOCS, POINTS)
    iterator = iter(stream)
    first = next(iterator)
    assert first.index == 0 and first.point == "Mix the dough"
    iterator.close()  # the consumer stops early: remaining expansions are cancelled
    with pytest.raises(RuntimeError, match="abandoned before it finished"):
        stream.result()
