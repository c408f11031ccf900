"""Closing plans (terse.backend.closing) and budget decisions (terse.backend.budget) on the reference
model's tokenizer: from any point of a valid output, the plan completes the grammar and the result parses
and validates; the search finds what the greedy walk misses; budgets below the shortest output are
refused with an error naming max_tokens."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from terse.backend.budget import CHECK, FREE
from terse.backend.constraints import (
    ChoiceConstraint,
    Constraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    ToolCallConstraint,
    ToolSpec,
    parse_tool_calls,
)
from terse.backend.grammar import ConstraintState, GrammarCompiler
from terse.backend.tokenization import load_tokenizer
from terse.errors import InvalidRequestError
from terse.models import reference_model_path
from tests.backend.structured_cases import SCHEMAS, SUM_TOOL, WEATHER_TOOL

EXAMPLES: dict[str, Any] = {
    "flat": {"name": "Ann Lee", "age": 30},
    "enum_and_bool": {"color": "green", "ok": False},
    "nested": {"user": {"id": 12, "tag": "ab c"}, "score": 0.5},
    "array": {"items": ["a", "c"]},
    "optional": {"title": "T", "note": "n", "count": -2},
    "defs_anyof": {"shape": {"x": 1, "y": 2}, "points": [{"x": 3, "y": 4}]},
}
TOOLS = ToolCallConstraint(
    (ToolSpec.of("get_weather", WEATHER_TOOL["function"]["parameters"]), ToolSpec.of("add", SUM_TOOL["function"]["parameters"])),
    "required",
)
TOOL_TEXT = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tok = load_tokenizer(reference_model_path())
    out = GrammarCompiler(tok, len(tok), [int(tok.eos_token_id)])
    out.compile(JsonObjectConstraint())  # builds the tokenizer index and the planner
    return out


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def _prefix_plans(compiler: GrammarCompiler, constraint: Constraint, text: str) -> list[str]:
    """The completed text from every token prefix of `text` (a valid output)."""
    tok = compiler._tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    planner = compiler._planner
    out = []
    for k in range(len(ids)):
        state = compiler.compile(constraint)
        assert planner is not None and state.matcher.consume_tokens(ids[:k])
        plan = planner.plan(state.matcher, 400)
        assert plan is not None and planner.completes(state.matcher, plan), (k, tok.decode(ids[:k]))
        out.append(tok.decode(ids[:k] + plan))
    return out


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_plan_from_any_prefix_completes_a_valid_value(compiler: GrammarCompiler, name: str) -> None:
    schema = SCHEMAS[name]
    for text in _prefix_plans(compiler, JsonSchemaConstraint.of(schema), _dump(EXAMPLES[name])):
        jsonschema.validate(json.loads(text), schema)


def test_json_object_tool_calls_regex_and_choices_close(compiler: GrammarCompiler) -> None:
    value = {"a": [1, {"b": "x y"}], "c": None, "d": -0.5}
    for text in _prefix_plans(compiler, JsonObjectConstraint(), _dump(value)):
        assert isinstance(json.loads(text), dict)
    for text in _prefix_plans(compiler, TOOLS, TOOL_TEXT):
        calls = parse_tool_calls(text)
        assert calls is not None and len(calls) == 1
        tool = {"get_weather": WEATHER_TOOL, "add": SUM_TOOL}[calls[0][0]]
        jsonschema.validate(json.loads(calls[0][1]), tool["function"]["parameters"])
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for text in _prefix_plans(compiler, RegexConstraint(pattern), "123-abcd"):
        assert re.fullmatch(pattern, text)
    for text in _prefix_plans(compiler, ChoiceConstraint(("yes please", "no")), "yes please"):
        assert text in ("yes please", "no")


def test_the_search_finds_what_the_greedy_walk_misses(compiler: GrammarCompiler) -> None:
    planner = compiler._planner
    assert planner is not None
    for pattern in (r"[a-z]+@[a-z]+\.com", r"(?s:.*)x"):
        matcher = compiler.compile(RegexConstraint(pattern)).matcher
        assert planner.greedy(matcher, 100) is None  # loops on a letter
        plan = planner.plan(matcher, 100)
        assert plan is not None and re.fullmatch(pattern, compiler._tokenizer.decode(plan))
    state = compiler.compile(JsonSchemaConstraint.of(SCHEMAS["enum_and_bool"]))
    quick, best = planner.plan(state.matcher, 100), planner.shortest(state.matcher, 100)
    assert quick is not None and best is not None and len(best) < len(quick)
    assert json.loads(compiler._tokenizer.decode(best))["color"] == "red"  # the shortest enum value
    assert state.shortest_len() == len(best)


def test_planning_leaves_the_matcher_where_it_was(compiler: GrammarCompiler) -> None:
    state = compiler.compile(JsonSchemaConstraint.of(SCHEMAS["nested"]))
    ids = compiler._tokenizer.encode('{"user": {"id": 7', add_special_tokens=False)
    assert state.matcher.consume_tokens(ids)
    planner = compiler._planner
    assert planner is not None
    before = bytes(state.matcher.compute_bitmask())
    planner.shortest(state.matcher, 100)
    planner.plan(state.matcher, 100)
    assert bytes(state.matcher.compute_bitmask()) == before and not state.matcher.is_accepting()


def test_a_budget_below_the_shortest_output_is_refused_naming_max_tokens(compiler: GrammarCompiler) -> None:
    state = compiler.compile(JsonSchemaConstraint.of(SCHEMAS["flat"]))
    shortest = state.shortest_len()
    assert shortest is not None and shortest > 2
    state.check_budget(shortest)
    with pytest.raises(InvalidRequestError, match=rf"max_tokens={shortest - 1} is too small.*at least {shortest}") as e:
        state.check_budget(shortest - 1)
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="shorten the prompt"):
        state.check_budget(1000, room=shortest - 1)
    compiler.compile(JsonObjectConstraint()).check_budget(2)  # "{}"


def _walk(compiler: GrammarCompiler, state: ConstraintState, text: str) -> None:
    for token in compiler._tokenizer.encode(text, add_special_tokens=False):
        state.advance(token)


def test_budget_steps_are_free_far_away_and_checked_near_the_end(compiler: GrammarCompiler) -> None:
    state = compiler.compile(JsonObjectConstraint())
    _walk(compiler, state, '{"key": "some text')
    planner, tok = compiler._planner, compiler._tokenizer
    assert planner is not None
    plan = planner.plan(state.matcher, 50)
    assert plan is not None and tok.decode(plan) == '"}'
    assert state.budget_step(500) == FREE
    assert state.budget_step(len(plan) + 1) == CHECK and not state.closed_by_budget
    word = tok.encode(" more", add_special_tokens=False)[0]
    assert state.check_token(word, len(plan) + 1) == word  # room for it and the closing `"}`
    closed = state.check_token(word, len(plan))  # no room left for the word: the plan's first token
    assert closed == plan[0] and state.closed_by_budget
    state.advance(closed)
    comma = tok.encode(",", add_special_tokens=False)[0]
    remaining = len(plan) - 1
    while not state.is_finished:  # the model keeps asking for another property; the budget says no
        assert state.budget_step(remaining) == CHECK
        token = state.check_token(comma, remaining)
        assert token != comma
        state.advance(token)
        remaining -= 1
    assert remaining == 0
