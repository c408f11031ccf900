"""Prompt-token accounting of `terse serve` and `wrap_openai`: tool definitions are counted in proxy mode
and by the wrapper (both sides, so the saving stays honest), engine mode's token counters include the tool
prompt it renders, engine mode's context check counts the prompt as the engine holds it (BOS included,
never twice), and its accounting headers agree with `usage.prompt_tokens`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from terse.backend.local.engine import LocalEngine
from terse.backend.tokenization import encode_plain, load_tokenizer, render_chat_template
from terse.pipelines.server import ServerConfig, ServerThread, engine_app
from terse.pipelines.server.hooks import ChatResult
from terse.pipelines.server.schema import ChatRequest
from terse.pipelines.wrap import estimate_prompt_tokens, last_accounting, wrap_openai
from tests.backend.structured_cases import SUM_TOOL, WEATHER_TOOL
from tests.pipelines.test_server import MESSAGES, MODEL
from tests.pipelines.test_server_proxy import start_proxy
from tests.pipelines.test_server_structured import PassThrough
from tests.pipelines.test_server_surface import _samples

TOOLS = [WEATHER_TOOL, SUM_TOOL]


class KeepLast:
    """Drops all but the last message: a saving the accounting must report unchanged with tools."""

    name = "keep-last"

    def on_request(self, request: ChatRequest) -> ChatRequest:
        return request.with_messages(request.messages[-1:])

    def on_response(self, request: ChatRequest, result: ChatResult) -> ChatResult:
        return result


def _accounting(response: httpx.Response) -> tuple[int, int, int]:
    h = response.headers
    return (int(h["x-terse-original-prompt-tokens"]), int(h["x-terse-sent-prompt-tokens"]),
            int(h["x-terse-saved-prompt-tokens"]))


# -- proxy mode ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[ServerThread, list[dict[str, Any]]]]:
    """An upstream that answers every chat with "ok" and keeps the bodies it got."""
    bodies: list[dict[str, Any]] = []

    async def chat(request: Request) -> Response:
        body = await request.json()
        bodies.append(body)
        return JSONResponse({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        })

    server = ServerThread(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])).start()
    yield server, bodies
    server.stop()


def _proxied(proxy: ServerThread, **extra: Any) -> httpx.Response:
    response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                          json={"model": MODEL, "messages": MESSAGES, **extra})
    assert response.status_code == 200, response.text
    return response


def test_proxy_estimate_counts_the_tools_on_both_sides(stub: tuple[ServerThread, list[dict[str, Any]]]) -> None:
    upstream, bodies = stub
    proxy = start_proxy(f"{upstream.url}/v1", hooks=(KeepLast(),))
    try:
        before = _samples(proxy)
        original, sent, saved = _accounting(_proxied(proxy, tools=TOOLS))
        assert bodies[-1]["tools"] == TOOLS  # forwarded as received
        assert original == estimate_prompt_tokens(MESSAGES, TOOLS) > estimate_prompt_tokens(MESSAGES)
        assert sent == estimate_prompt_tokens(MESSAGES[-1:], TOOLS) > estimate_prompt_tokens(MESSAGES[-1:])
        assert saved == _accounting(_proxied(proxy))[2]  # the tools are on both sides: the saving is unchanged
        after = _samples(proxy)
        num_original = after["terse_prompt_tokens_original_total"] - before.get("terse_prompt_tokens_original_total", 0)
        assert num_original == original + estimate_prompt_tokens(MESSAGES)  # the metrics count the tools too
    finally:
        proxy.stop()


def test_proxy_tokenizer_counts_each_tool_definition_as_json(
    stub: tuple[ServerThread, list[dict[str, Any]]], tiny_llama: Path
) -> None:
    """The tiny model's template does not render tools: their JSON, one definition a line, is counted in the
    upstream's tokenizer beside the rendered messages."""
    proxy = start_proxy(f"{stub[0].url}/v1", hooks=(KeepLast(),), tokenizer=str(tiny_llama))
    tok = load_tokenizer(tiny_llama)
    tools_text = "\n".join(json.dumps(t, separators=(",", ":")) for t in TOOLS)
    num_tools = len(encode_plain(tok, tools_text))
    try:
        original, sent, saved = _accounting(_proxied(proxy, tools=TOOLS))
        assert original == len(encode_plain(tok, render_chat_template(tok, MESSAGES))) + num_tools
        assert sent == len(encode_plain(tok, render_chat_template(tok, MESSAGES[-1:]))) + num_tools
        assert (original - num_tools, sent - num_tools, saved) == _accounting(_proxied(proxy))
    finally:
        proxy.stop()


# -- wrap_openai --------------------------------------------------------------------------------------------


class _FakeCompletions:
    """Answers "ok" with a usage object, keeping the kwargs of every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def create(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content="ok"))], usage=SimpleNamespace())


def _wrapped_accounting(count: Callable[..., int] | None = None, **kwargs: Any) -> tuple[int, int, str]:
    fake = _FakeCompletions()
    client = SimpleNamespace(chat=SimpleNamespace(completions=fake))
    wrapped = wrap_openai(client, KeepLast()) if count is None else wrap_openai(client, KeepLast(), count_prompt_tokens=count)
    accounting = last_accounting(wrapped.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs))
    assert accounting is not None
    assert fake.calls[-1].get("tools") == kwargs.get("tools")  # passed on untouched
    return accounting.original_prompt_tokens, accounting.sent_prompt_tokens, accounting.token_count


def test_wrap_openai_counts_the_tools_with_every_kind_of_counter() -> None:
    assert _wrapped_accounting(tools=TOOLS) == (
        estimate_prompt_tokens(MESSAGES, TOOLS), estimate_prompt_tokens(MESSAGES[-1:], TOOLS), "estimate")

    def with_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> int:
        return 10 * len(messages) + 100 * len(tools)

    assert _wrapped_accounting(with_tools, tools=TOOLS)[:2] == (220, 210)

    def characters(messages: Sequence[Mapping[str, Any]]) -> int:  # a counter of messages alone still works
        return sum(len(m["content"]) for m in messages)

    tools_text = "\n".join(json.dumps(t, separators=(",", ":")) for t in TOOLS)  # one more message: the tools
    num_original = sum(len(m["content"]) for m in MESSAGES)
    assert _wrapped_accounting(characters, tools=TOOLS)[:2] == (num_original + len(tools_text),
                                                                len(MESSAGES[-1]["content"]) + len(tools_text))
    assert _wrapped_accounting(characters)[:2] == (num_original, len(MESSAGES[-1]["content"]))


# -- engine mode --------------------------------------------------------------------------------------------

MAX_MODEL_LEN = 256


def _engine_server(model_dir: Path, max_model_len: int) -> Iterator[tuple[ServerThread, LocalEngine]]:
    engine = LocalEngine.from_spec(str(model_dir), num_kv_blocks=400, max_model_len=max_model_len)
    server = ServerThread(engine_app(engine, ServerConfig(served_model_names=(MODEL,)), [PassThrough()])).start()
    yield server, engine
    server.stop()
    engine.close()


@pytest.fixture(scope="module")
def engine_server(tiny_model_factory: Callable[..., Path]) -> Iterator[tuple[ServerThread, LocalEngine]]:
    """A short context, so a request may fill it quickly."""
    yield from _engine_server(tiny_model_factory("llama"), MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def tools_server(tiny_model_factory: Callable[..., Path]) -> Iterator[tuple[ServerThread, LocalEngine]]:
    """A context the tool prompt fits in (the tiny vocabulary spells it in ~400 tokens)."""
    yield from _engine_server(tiny_model_factory("llama"), 2048)


def _post(server: ServerThread, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", timeout=120, json={"model": MODEL, "temperature": 0, **body})


def test_engine_metrics_count_the_tool_prompt(tools_server: tuple[ServerThread, LocalEngine]) -> None:
    server = tools_server[0]
    before = _samples(server)
    response = _post(server, "chat/completions", {"messages": MESSAGES, "tools": [WEATHER_TOOL], "max_tokens": 2})
    assert response.status_code == 200, response.text
    original, sent, saved = _accounting(response)
    after = _samples(server)
    grown = {k: after[k] - before.get(k, 0) for k in (
        "terse_prompt_tokens_original_total", "terse_prompt_tokens_sent_total", "terse_prompt_tokens_saved_total")}
    assert grown == {"terse_prompt_tokens_original_total": original, "terse_prompt_tokens_sent_total": sent,
                     "terse_prompt_tokens_saved_total": saved}
    assert sent > _accounting(_post(server, "chat/completions", {"messages": MESSAGES, "max_tokens": 2}))[1] + 20


def test_engine_accounting_counts_the_prompt_as_usage_does(tools_server: tuple[ServerThread, LocalEngine]) -> None:
    server = tools_server[0]
    for body in ({"messages": MESSAGES}, {"messages": MESSAGES, "tools": [WEATHER_TOOL]}):
        response = _post(server, "chat/completions", {**body, "max_tokens": 2})
        assert response.status_code == 200, response.text
        original, sent, saved = _accounting(response)
        assert original == sent == response.json()["usage"]["prompt_tokens"] and saved == 0  # BOS on both sides


@pytest.mark.parametrize("path, body", [
    ("chat/completions", {"messages": MESSAGES}),
    ("completions", {"prompt": "Where does Alice work?"}),
    ("completions", {"prompt": "<s>Where does Alice work?"}),  # starts with BOS: not counted twice
])
def test_max_tokens_filling_the_context_passes_one_more_gets_the_servers_400(
    engine_server: tuple[ServerThread, LocalEngine], path: str, body: dict[str, Any]
) -> None:
    server, engine = engine_server
    probe = _post(server, path, {**body, "max_tokens": 1})
    assert probe.status_code == 200, probe.text
    num_held = probe.json()["usage"]["prompt_tokens"]  # what the engine held, BOS included
    if "prompt" in body:
        assert num_held == len(encode_plain(engine.tokenizer, body["prompt"])) + (not body["prompt"].startswith("<s>"))
    room = MAX_MODEL_LEN - num_held
    fits = _post(server, path, {**body, "max_tokens": room, "ignore_eos": True})
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["completion_tokens"] == room
    over = _post(server, path, {**body, "max_tokens": room + 1})
    assert over.status_code == 400, over.text
    error = over.json()["error"]
    assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert f"ask for at most {room}" in error["message"]  # the server's check, not the engine's refusal
