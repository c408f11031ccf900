"""Constraint values, grammar masks (EOS only where the grammar is complete), the bitmask application,
the tool-call text format and its OpenAI wire mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from terse.backend.constraints import (
    ChoiceConstraint,
    GrammarConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    ToolCallConstraint,
    ToolSpec,
    parse_tool_calls,
)
from terse.backend.grammar import GrammarCompiler, bitmask_width, fill_bitmask, strict_schema
from terse.backend.openai_structured import ToolCallText, message_text, structured_payload
from terse.backend.sampling import apply_token_bitmask
from terse.backend.types import SamplingParams
from terse.errors import InvalidRequestError
from tests.tiny_models import train_tokenizer


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tok = train_tokenizer(512)
    return GrammarCompiler(tok, len(tok) + 5, [tok.eos_token_id])  # 5 padded logits never allowed


def _allowed(compiler: GrammarCompiler, state: object) -> set[int]:
    bitmask = torch.zeros(1, bitmask_width(compiler.vocab_size), dtype=torch.int32)
    fill_bitmask([state], bitmask)  # type: ignore[list-item]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: compiler.vocab_size]
    return set(np.nonzero(bits)[0].tolist())


def test_constraint_values_are_validated() -> None:
    with pytest.raises(InvalidRequestError, match="regex"):
        RegexConstraint("")
    with pytest.raises(InvalidRequestError, match="must be a JSON object"):
        JsonSchemaConstraint.of("[1, 2]")
    with pytest.raises(InvalidRequestError, match="non-empty tuple"):
        ChoiceConstraint(("a", ""))
    with pytest.raises(InvalidRequestError, match="start"):
        GrammarConstraint("x: y")
    tool = ToolSpec.of("f")
    with pytest.raises(InvalidRequestError, match="not among tools"):
        ToolCallConstraint((tool,), "required", "g")
    with pytest.raises(InvalidRequestError, match="unique"):
        ToolCallConstraint((tool, tool))
    with pytest.raises(InvalidRequestError, match="constraint="):
        SamplingParams(constraint="json")  # type: ignore[arg-type]
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}}
    assert list(JsonSchemaConstraint.of(schema).schema["properties"]) == ["b", "a"]  # order kept
    assert hash(JsonSchemaConstraint.of(schema)) == hash(JsonSchemaConstraint.of(json.dumps(schema)))


def test_eos_is_allowed_only_where_the_grammar_is_complete(compiler: GrammarCompiler) -> None:
    tok = compiler._tokenizer
    eos = tok.eos_token_id
    state = compiler.compile(RegexConstraint("[0-9]+"))
    start = _allowed(compiler, state)
    assert eos not in start and start and all(tok.decode([t]).isdigit() for t in start)
    assert not any(t >= len(tok) for t in start)
    finished = state.advance(tok.encode("7", add_special_tokens=False)[0])
    assert not finished and eos in _allowed(compiler, state)  # "7" is complete, more digits may follow
    schema_state = compiler.compile(JsonSchemaConstraint.of({"type": "object", "properties": {"a": {"type": "integer"}},
                                                             "required": ["a"]}))
    ids = tok.encode('{"a": 12', add_special_tokens=False)
    assert not any(schema_state.advance(t) for t in ids) and eos not in _allowed(compiler, schema_state)
    assert schema_state.advance(tok.encode("}", add_special_tokens=False)[0])  # the grammar is finished
    assert _allowed(compiler, schema_state) == {eos}


def test_batched_fill_equals_one_by_one(compiler: GrammarCompiler) -> None:
    constraints = [RegexConstraint("[a-z]{2}"), ChoiceConstraint(("yes", "no")),
                   JsonSchemaConstraint.of({"type": "array", "items": {"type": "integer"}})]
    states = [compiler.compile(c) for c in constraints]
    batched = torch.zeros(4, bitmask_width(compiler.vocab_size), dtype=torch.int32)
    fill_bitmask(states, batched)
    for i, state in enumerate(states):
        single = torch.zeros(1, batched.shape[1], dtype=torch.int32)
        fill_bitmask([state], single)
        assert torch.equal(single[0], batched[i])


def test_apply_token_bitmask_masks_only_the_given_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 70, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, bitmask_width(70)), dtype=torch.int32, generator=gen)
    masked = logits.clone()
    apply_token_bitmask(masked, bitmask, [3, 1])
    for row, mask_row in ((3, 0), (1, 1)):
        for t in range(70):
            allowed = (int(bitmask[mask_row, t // 32]) >> (t % 32)) & 1
            assert masked[row, t] == (logits[row, t] if allowed else float("-inf"))
    for row in (0, 2, 4):
        assert torch.equal(masked[row], logits[row])


def test_strict_schema_closes_every_object() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}},
              "$defs": {"p": {"properties": {"x": {"type": "integer"}}}},
              "anyOf": [{"type": "object"}], "additionalProperties": {"type": "object"}}
    out = strict_schema(schema)
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["$defs"]["p"]["additionalProperties"] is False and out["anyOf"][0]["additionalProperties"] is False
    assert out["additionalProperties"] == {"type": "object", "additionalProperties": False}


def test_tool_call_text_round_trips_through_the_wire_format() -> None:
    text = ToolCallText()
    pieces = [
        text.push({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "add", "arguments": ""}}]}),
        text.push({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1, '}}]}),
        text.push({"tool_calls": [{"index": 0, "function": {"arguments": '"b": "}</tool_call>"}'}}]}),
        text.push({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "f", "arguments": "{}"}}]}),
        text.close(),
    ]
    joined = "".join(pieces)
    assert parse_tool_calls(joined) == [("add", '{"a": 1, "b": "}</tool_call>"}'), ("f", "{}")]
    whole = {"tool_calls": [{"function": {"name": "add", "arguments": '{"a": 1, "b": "}</tool_call>"}'}},
                            {"function": {"name": "f", "arguments": "{}"}}]}
    assert message_text(whole) == joined
    assert parse_tool_calls("plain text") is None and parse_tool_calls(joined[:-3]) is None


def test_constraints_map_to_openai_request_fields() -> None:
    schema = JsonSchemaConstraint.of({"type": "object"}, name="answer")
    assert structured_payload(schema) == {"response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}, "strict": True}}}
    assert structured_payload(ChoiceConstraint(("a", "b"))) == {"structured_outputs": {"choice": ["a", "b"]}}
    tools = ToolCallConstraint((ToolSpec.of("f", None, "does f"),), "required", "f", max_calls=1)
    payload = structured_payload(tools)
    assert payload["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert payload["parallel_tool_calls"] is False and payload["tools"][0]["function"]["description"] == "does f"
    assert structured_payload(None) == {}
