"""Budget-aware closing in the local engine, on tiny random models that write free-form JSON until they are
stopped: with small max_tokens every constrained output parses and validates (batched, greedy and
sampled, streamed), an output that finishes on its own is the same as with a large budget, unconstrained
neighbours are untouched, and a budget below the shortest output is refused."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from terse.backend.constraints import (
    Constraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    ToolCallConstraint,
    ToolSpec,
    parse_tool_calls,
)
from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams
from terse.errors import InvalidRequestError
from tests.backend.structured_cases import SCHEMAS, SUM_TOOL, WEATHER_TOOL

PROMPTS = ["Record 0: describe", "Record 1: describe", "The quick brown fox", "Alice works at Acme"]
TOOLS = ToolCallConstraint(
    (ToolSpec.of("get_weather", WEATHER_TOOL["function"]["parameters"]), ToolSpec.of("add", SUM_TOOL["function"]["parameters"])),
    "required",
    max_calls=2,
)
KINDS: dict[str, tuple[Constraint, Any]] = {
    "json_object": (JsonObjectConstraint(), None),
    **{name: (JsonSchemaConstraint.of(schema), schema) for name, schema in SCHEMAS.items()},
    "tools": (TOOLS, None),
    "regex": (RegexConstraint(r"[a-z]{2,}@[a-z]+\.(com|org)"), None),
}


@pytest.fixture(scope="module", params=[("llama", 1), ("qwen2", 2)], ids=["llama-1", "qwen2-2"])
def engine(request: pytest.FixtureRequest, tiny_model_factory: Callable[..., Path]) -> Iterator[LocalEngine]:
    arch, seed = request.param  # the two tiny models whose JSON-mode outputs ran into max_tokens before
    eng = LocalEngine.from_spec(str(tiny_model_factory(arch, seed=seed)), num_kv_blocks=192, max_model_len=512)
    yield eng
    eng.close()


def assert_valid(kind: str, text: str) -> None:
    schema = KINDS[kind][1]
    if kind == "tools":
        calls = parse_tool_calls(text)
        assert calls, text
        for name, arguments in calls:
            tool = {"get_weather": WEATHER_TOOL, "add": SUM_TOOL}[name]
            jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])
    elif kind == "regex":
        assert KINDS[kind][0].pattern and __import__("re").fullmatch(KINDS[kind][0].pattern, text), text  # type: ignore[union-attr]
    else:
        value = json.loads(text)
        assert isinstance(value, dict)
        if schema is not None:
            jsonschema.validate(value, schema)


def _shortest(engine: LocalEngine, constraint: Constraint) -> int:
    n = engine._grammar.compile(constraint).shortest_len()  # type: ignore[union-attr]
    assert n is not None
    return n


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_output_under_a_small_budget_parses_and_validates(engine: LocalEngine, kind: str) -> None:
    constraint = KINDS[kind][0]
    shortest = _shortest(engine, constraint)
    num_length = 0
    for extra in (0, 3, 11, 25):
        for temperature in (0.0, 1.0):
            params = SamplingParams(max_tokens=shortest + extra, temperature=temperature, seed=5, constraint=constraint)
            for out in engine.generate(PROMPTS, params):
                assert len(out.token_ids) <= shortest + extra
                assert_valid(kind, out.text)
                num_length += out.finish_reason == "length"
    if kind != "regex":
        assert num_length > 0  # closing was exercised, not only outputs that ended early


def test_outputs_that_finish_on_their_own_are_unchanged(engine: LocalEngine) -> None:
    num_compared = 0
    for kind in ("json_object", "nested", "optional", "defs_anyof", "tools"):
        constraint = KINDS[kind][0]
        free = engine.generate(PROMPTS, SamplingParams(max_tokens=400, constraint=constraint))
        for prompt, out in zip(PROMPTS, free):
            if out.finish_reason != "stop":
                continue
            for extra in (0, 1, 3):  # the budget ends just where (or just after) the output ended on its own
                params = SamplingParams(max_tokens=len(out.token_ids) + extra, constraint=constraint)
                capped = engine.generate([prompt], params)[0]
                assert (capped.token_ids, capped.finish_reason) == (out.token_ids, "stop"), (kind, extra, out.text)
                num_compared += 1
    assert num_compared >= 30


def test_a_closed_output_streams_and_ends_with_length(engine: LocalEngine) -> None:
    constraint = KINDS["json_object"][0]
    free = engine.submit(PROMPTS[0], SamplingParams(max_tokens=400, constraint=constraint)).result()
    budget = max(_shortest(engine, constraint), len(free.token_ids) // 2)
    handle = engine.submit(PROMPTS[0], SamplingParams(max_tokens=budget, constraint=constraint))
    deltas = list(handle)
    result = handle.result()
    assert "".join(deltas) == result.text and len(result.token_ids) == budget
    if free.finish_reason == "length" or len(free.token_ids) > budget:
        assert result.finish_reason == "length"
    assert_valid("json_object", result.text)


def test_unconstrained_neighbours_of_closing_rows_decode_as_alone(engine: LocalEngine) -> None:
    free = SamplingParams(max_tokens=24, ignore_eos=True)
    alone = [o.token_ids for o in engine.generate(PROMPTS, free)]
    closing = SamplingParams(max_tokens=_shortest(engine, TOOLS) + 2, temperature=1.0, seed=1, constraint=TOOLS)
    handles = [engine.submit(p, free if i % 2 == 0 else closing) for i, p in enumerate(PROMPTS)]
    results = [h.result() for h in handles]
    assert [results[0].token_ids, results[2].token_ids] == [alone[0], alone[2]]
    for out in results[1::2]:
        assert_valid("tools", out.text)


def test_a_budget_below_the_shortest_output_is_refused(engine: LocalEngine) -> None:
    constraint = KINDS["nested"][0]
    shortest = _shortest(engine, constraint)
    with pytest.raises(InvalidRequestError, match=f"max_tokens={shortest - 1} is too small") as e:
        engine.submit(PROMPTS[0], SamplingParams(max_tokens=shortest - 1, constraint=constraint))
    assert e.value.param == "max_tokens"
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=shortest, constraint=constraint))[0]
    assert_valid("nested", out.text)
