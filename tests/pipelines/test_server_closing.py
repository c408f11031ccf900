"""Budget-aware closing through `terse serve` (engine mode, a tiny random model that writes until it is
stopped): a max_tokens below the shortest output is a 400 naming max_tokens; with a small max_tokens JSON
mode parses and tool calls (whole and streamed) carry valid arguments, with finish_reason "length"."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from terse.backend.local.engine import LocalEngine
from terse.pipelines.server import ServerConfig, ServerThread, engine_app
from tests.backend.structured_cases import SUM_TOOL, WEATHER_TOOL

MODEL = "tiny"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NOTE_TOOL: dict[str, Any] = {  # a free-form string: a random model writes it until it is stopped
    "type": "function",
    "function": {"name": "note", "description": "Write a note",
                 "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
}
TOOLS = [WEATHER_TOOL, SUM_TOOL, NOTE_TOOL]
NAMED = {"type": "function", "function": {"name": "note"}}


@pytest.fixture(scope="module")
def url(tiny_model_factory: Callable[..., Path]) -> Iterator[str]:
    engine = LocalEngine.from_spec(str(tiny_model_factory("qwen2", seed=2)), num_kv_blocks=256, max_model_len=1024)
    server = ServerThread(engine_app(engine, ServerConfig(served_model_names=(MODEL,)))).start()
    yield server.url
    server.stop()
    engine.close()


def _shortest(url: str, body: dict[str, Any]) -> int:
    """The shortest output's length, read from the 400 a one-token budget gets."""
    answer = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 1}, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "max_tokens" and "max_tokens=1 is too small" in error["message"]
    found = re.search(r"at least (\d+)", error["message"])
    assert found is not None
    return int(found.group(1))


def _check_call(name: str, arguments: str) -> None:
    tool = {t["function"]["name"]: t for t in TOOLS}[name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_small_budgets_give_parseable_json_and_tool_calls(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                           max_tokens=9, temperature=1.0, seed=3, n=3)
    for choice in reply.choices:
        assert isinstance(json.loads(choice.message.content or ""), dict)
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": NAMED, "parallel_tool_calls": False}
    budget = _shortest(url, body) + 6
    reasons = set()
    for seed in range(3):
        whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,  # type: ignore[arg-type]
                                               parallel_tool_calls=False, max_tokens=budget, temperature=1.0, seed=seed)
        choice = whole.choices[0]
        reasons.add(choice.finish_reason)
        (call,) = choice.message.tool_calls or []
        _check_call(call.function.name, call.function.arguments)
    assert "length" in reasons  # closed by the budget, still a complete call
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED,  # type: ignore[arg-type]
                                            parallel_tool_calls=False, max_tokens=budget, temperature=1.0, seed=0,
                                            stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    name = deltas[0].function.name if deltas and deltas[0].function else None
    assert name is not None
    _check_call(name, "".join(d.function.arguments or "" for d in deltas if d.function))
    assert chunks[-1].choices[0].finish_reason in ("length", "tool_calls")


def test_a_json_schema_budget_below_its_shortest_output_is_a_400(url: str) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city", "days"]}
    body = {"model": MODEL, "messages": ASK,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": True}}}
    shortest = _shortest(url, body)
    answer = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": shortest}, timeout=60)
    assert answer.status_code == 200, answer.text
    jsonschema.validate(json.loads(answer.json()["choices"][0]["message"]["content"]), schema)
