"""Structured output through `terse serve` (engine mode, local engine on a tiny random Llama): JSON mode,
JSON schema, tool calls (auto / required / none / named; whole and streamed) through the official `openai`
client, LangChain's `bind_tools` / `with_structured_output`, the openai: backend, and 400s that name the
problem."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from terse.backend import SamplingParams, load_backend
from terse.backend.constraints import (
    ChoiceConstraint,
    JsonSchemaConstraint,
    ToolCallConstraint,
    ToolSpec,
    parse_tool_calls,
)
from terse.backend.local.engine import LocalEngine
from terse.pipelines.server import ServerConfig, ServerThread, engine_app
from tests.backend.structured_cases import SCHEMAS, SUM_TOOL, WEATHER_TOOL

MODEL = "tiny"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class _Recording:
    """The engine, keeping every prompt it was given."""

    def __init__(self, inner: LocalEngine) -> None:
        self.inner = inner
        self.prompts: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def submit(self, prompt: Any, params: SamplingParams) -> Any:
        self.prompts.append(prompt)
        return self.inner.submit(prompt, params)


@pytest.fixture(scope="module")
def served(tiny_model_factory: Callable[..., Path]) -> Iterator[tuple[str, _Recording]]:
    engine = LocalEngine.from_spec(str(tiny_model_factory("llama")), num_kv_blocks=400, max_model_len=2048)
    recording = _Recording(engine)
    server = ServerThread(engine_app(recording, ServerConfig(served_model_names=(MODEL,)))).start()  # type: ignore[arg-type]
    yield server.url, recording
    server.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(served: tuple[str, _Recording]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0)


def _schema_format(name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def _check_call(call: Any, tool: dict[str, Any]) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_json_mode_and_json_schema_outputs_parse_and_validate(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                           max_tokens=150, temperature=0)
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)
    for name in ("nested", "defs_anyof"):
        whole = client.chat.completions.create(model=MODEL, messages=ASK, response_format=_schema_format(name),
                                               max_tokens=200, temperature=1.0, seed=5, n=2)
        for choice in whole.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content or ""), SCHEMAS[name])
        stream = client.chat.completions.create(model=MODEL, messages=ASK, response_format=_schema_format(name),
                                                max_tokens=200, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_required_and_named_tool_calls_whole_and_streamed(client: openai.OpenAI) -> None:
    tools = [WEATHER_TOOL, SUM_TOOL]
    required = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice="required",
                                              parallel_tool_calls=False, max_tokens=120, temperature=0)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    _check_call(call, {t["function"]["name"]: t for t in tools}[call.function.name])
    named = {"type": "function", "function": {"name": "add"}}
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=tools, tool_choice=named,
                                            max_tokens=120, temperature=1.0, seed=2, stream=True)
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "add" and {d.index for d in deltas} == {0}
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), SUM_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_and_none(client: openai.OpenAI, served: tuple[str, _Recording]) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], max_tokens=60,
                                               temperature=1.0, seed=seed)
        message = reply.choices[0].message
        if message.tool_calls:
            assert reply.choices[0].finish_reason == "tool_calls"
            _check_call(message.tool_calls[0], WEATHER_TOOL)
        else:
            assert "<tool_call>" not in (message.content or "")
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None and "get_weather" not in served[1].prompts[-1]


def test_tool_history_is_written_into_the_prompt(client: openai.OpenAI, served: tuple[str, _Recording]) -> None:
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    ]
    client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], max_tokens=4, temperature=0)
    prompt = served[1].prompts[-1]
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>' in prompt
    assert "21 degrees, sunny" in prompt and "You can call these functions" in prompt


class PassThrough:
    """A hook that changes nothing: with a hook the server accounts for the prompt (x-terse-* headers)."""

    name = "pass"

    def on_request(self, request: Any) -> Any:
        return request

    def on_response(self, request: Any, result: Any) -> Any:
        return result


def test_tool_prompt_counts_in_the_accounting_and_the_context_check(tiny_model_factory: Callable[..., Path]) -> None:
    engine = LocalEngine.from_spec(str(tiny_model_factory("llama")), num_kv_blocks=400, max_model_len=2048)
    server = ServerThread(engine_app(engine, ServerConfig(served_model_names=(MODEL,)), [PassThrough()])).start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        plain = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0)
        with_tools = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=ASK, tools=[WEATHER_TOOL], max_tokens=2, temperature=0)
        sent_plain = int(plain.headers["x-terse-sent-prompt-tokens"])
        sent = int(with_tools.headers["x-terse-sent-prompt-tokens"])
        usage = with_tools.parse().usage
        assert usage is not None and usage.model_extra is not None
        assert sent == usage.model_extra["terse"]["sent_prompt_tokens"]
        assert sent <= usage.prompt_tokens <= sent + 1  # what the model read (+ BOS)
        assert sent > sent_plain + 20  # the tool prompt is counted
        assert int(with_tools.headers["x-terse-saved-prompt-tokens"]) == 0
        # max_tokens that fits beside the messages alone but not beside the tool prompt: a 400 naming it
        too_many = 2048 - sent_plain
        answer = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": ASK, "tools": [WEATHER_TOOL], "max_tokens": too_many})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
        assert f"ask for at most {2048 - usage.prompt_tokens}" in error["message"]  # the prompt as the engine holds it
    finally:
        server.stop()
        engine.close()


def test_invalid_structured_requests_get_400s_naming_the_problem(served: tuple[str, _Recording]) -> None:
    url = f"{served[0]}/v1/chat/completions"
    bad_schema = {"type": "object", "properties": {"a": {"type": "strin"}}}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": bad_schema}}},
         "response_format.json_schema.schema", "Invalid type: strin"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": bad_schema}}]},
         "tools[0].function.parameters", "Invalid type: strin"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "'nope'"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs.regex", "unclosed character class"),
    ]
    for extra, param, words in cases:
        answer = httpx.post(url, json={"model": MODEL, "messages": ASK, **extra}, timeout=30)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == param and words in error["message"]


def test_completions_endpoint_and_the_openai_backend_carry_constraints(served: tuple[str, _Recording]) -> None:
    url = served[0]
    answer = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Pick:", "max_tokens": 10,
                                                       "structured_outputs": {"choice": ["red", "blue"]}}, timeout=30)
    assert answer.json()["choices"][0]["text"] in ("red", "blue")
    remote = load_backend(f"openai:{url}/v1#{MODEL}", api_key="unused")
    try:
        schema = SCHEMAS["array"]
        out = remote.generate(["Items:"], SamplingParams(max_tokens=80, constraint=JsonSchemaConstraint.of(schema)))
        jsonschema.validate(json.loads(out[0].text), schema)
        assert remote.generate(["Pick:"], SamplingParams(max_tokens=8, constraint=ChoiceConstraint(("yes", "no"))))[
            0
        ].text in ("yes", "no")
        tools = ToolCallConstraint((ToolSpec.of("add", SUM_TOOL["function"]["parameters"]),), "required", "add", 1)
        for stream in (True, False):
            remote.config = dataclass_replace(remote.config, stream=stream)  # type: ignore[attr-defined]
            handle = remote.submit_chat(ASK, SamplingParams(max_tokens=80, constraint=tools))  # type: ignore[attr-defined]
            ((name, arguments),) = parse_tool_calls(handle.result().text) or []
            assert name == "add"
            jsonschema.validate(json.loads(arguments), SUM_TOOL["function"]["parameters"])
    finally:
        remote.close()


def dataclass_replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def test_langchain_bind_tools_and_with_structured_output(served: tuple[str, _Recording]) -> None:
    pytest.importorskip("langchain_openai")
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    chat = ChatOpenAI(base_url=f"{served[0]}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=120,  # type: ignore[arg-type]
                      max_retries=0)
    message = chat.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke("Weather in Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_TOOL["function"]["parameters"])

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=120)

    for method in ("json_schema", "function_calling"):
        person = chat.with_structured_output(Person, method=method).invoke("Who is Alice?")  # type: ignore[arg-type]
        assert isinstance(person, Person) and 0 <= person.age <= 120
    as_json = chat.with_structured_output(method="json_mode").invoke("Answer in JSON.")
    assert isinstance(as_json, dict)
