"""`terse serve` in proxy mode: in front of a second terse server (engine mode, tiny model) and in front of
scripted upstreams that fail, stall or check headers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from terse.backend import load_backend
from terse.backend.openai_http import RetryPolicy
from terse.pipelines.server import ProxyConfig, ServerConfig, ServerThread, proxy_app
from terse.pipelines.server.hooks import ChatResult
from terse.pipelines.server.schema import ChatRequest
from tests.pipelines.test_server import EMBEDDER, MESSAGES, MODEL, start_engine_server

FAST_RETRY = RetryPolicy(max_retries=2, initial_backoff_s=0.01, max_backoff_s=0.02, jitter=0.0)


class KeepLastUserMessage:
    """A test hook: drops everything but the last message (a crude 'compression'); shouts answers."""

    name = "keep-last"

    def on_request(self, request: ChatRequest) -> ChatRequest:
        return request.with_messages(request.messages[-1:])

    def on_response(self, request: ChatRequest, result: ChatResult) -> ChatResult:
        return ChatResult(tuple(t.upper() for t in result.texts))


@pytest.fixture(scope="module")
def upstream(tiny_llama: Path) -> Iterator[ServerThread]:
    server = start_engine_server(load_backend(f"hf:{tiny_llama}"))
    yield server
    server.stop()


def start_proxy(upstream_url: str, hooks: tuple[Any, ...] = (), **proxy: Any) -> ServerThread:
    server_config = ServerConfig(api_key=proxy.pop("api_key", None))
    config = ProxyConfig(upstream_url=upstream_url, retry=proxy.pop("retry", FAST_RETRY), **proxy)
    return ServerThread(proxy_app(config, server_config, hooks)).start()


@pytest.fixture(scope="module", params=["h11", "httpx"])
def transport(request: pytest.FixtureRequest) -> str:
    """Both upstream transports run every proxy test."""
    return str(request.param)


@pytest.fixture(scope="module")
def proxy(upstream: ServerThread, transport: str) -> Iterator[ServerThread]:
    server = start_proxy(f"{upstream.url}/v1", transport=transport)
    yield server
    server.stop()


def clients(*servers: ServerThread) -> list[openai.OpenAI]:
    return [openai.OpenAI(api_key="unused", base_url=f"{s.url}/v1", max_retries=0, timeout=60) for s in servers]


def test_proxy_answers_like_the_upstream(upstream: ServerThread, proxy: ServerThread) -> None:
    direct, via = clients(upstream, proxy)
    args: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 0}
    want = direct.chat.completions.create(**args)
    raw = via.chat.completions.with_raw_response.create(**args, extra_headers={"x-request-id": "prx-1"})
    got = raw.parse()
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.id == "chatcmpl-prx-1"  # the request id travelled upstream
    assert raw.headers["x-request-id"] == "prx-1" and raw.headers["x-terse-saved-prompt-tokens"] == "0"
    assert got.usage is not None and want.usage is not None
    assert got.usage.completion_tokens == want.usage.completion_tokens
    chunks = list(via.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert chunks[-1].usage is not None
    completion = via.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert completion.choices[0].text == direct.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0
    ).choices[0].text
    assert [m.id for m in via.models.list().data] == [MODEL, EMBEDDER]


def test_upstream_client_errors_pass_through(proxy: ServerThread) -> None:
    (via,) = clients(proxy)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        via.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context length"):
        via.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4000)
    malformed = httpx.post(f"{proxy.url}/v1/chat/completions", content=b"{nope", timeout=30)
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"


def test_engine_client_errors_stay_400s_behind_the_proxy(proxy: ServerThread) -> None:
    """Once 500s the proxy retried three times and turned into a 502; now one 400 passed through."""
    for tokens in ([-1], [2**40]):
        response = httpx.post(f"{proxy.url}/detokenize", json={"tokens": tokens}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "tokens"
    seed = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "seed": 2**70})
    assert seed.status_code == 400 and seed.json()["error"]["param"] == "seed"  # checked before forwarding
    surrogate = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800x"}]}'
    response = httpx.post(f"{proxy.url}/v1/chat/completions", content=surrogate, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_hooks_rewrite_requests_and_answers_with_accounting(upstream: ServerThread, transport: str) -> None:
    proxy = start_proxy(f"{upstream.url}/v1", hooks=(KeepLastUserMessage(),), transport=transport)
    try:
        direct, via = clients(upstream, proxy)
        args: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "temperature": 0}
        raw = via.chat.completions.with_raw_response.create(messages=MESSAGES, **args)
        got = raw.parse()
        want = direct.chat.completions.create(messages=MESSAGES[-1:], **args)
        assert got.choices[0].message.content == (want.choices[0].message.content or "").upper()
        saved = int(raw.headers["x-terse-saved-prompt-tokens"])
        assert saved > 0
        assert saved == int(raw.headers["x-terse-original-prompt-tokens"]) - int(raw.headers["x-terse-sent-prompt-tokens"])
        assert got.usage is not None and got.model_extra is not None
        assert got.usage.model_extra is not None and got.usage.model_extra["terse"]["saved_prompt_tokens"] == saved
    finally:
        proxy.stop()


def test_upstream_down_gives_502_after_logged_retries(caplog: pytest.LogCaptureFixture, transport: str) -> None:
    caplog.set_level(logging.WARNING, logger="terse.backend.openai")
    proxy = start_proxy("http://127.0.0.1:9/v1", transport=transport)  # port 9 (discard): nothing listens on loopback
    try:
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}, timeout=30)
        assert response.status_code == 502
        error = response.json()["error"]
        assert "cannot reach http://127.0.0.1:9/v1/chat/completions" in error["message"]
        assert error["code"] == "upstream_unavailable"
        retries = [r for r in caplog.records if r.message.startswith("retrying http://127.0.0.1:9")]
        assert len(retries) == FAST_RETRY.max_retries
        health = httpx.get(f"{proxy.url}/health")  # still serving, and says the upstream is down
        assert health.status_code == 503 and health.json()["upstream"]["status"] == "unreachable"
    finally:
        proxy.stop()


@dataclasses.dataclass
class Script:
    """What the scripted upstream does: fail the first calls, stall, and remember what it saw."""

    num_failures: int = 0
    delay_s: float = 0.0
    calls: int = 0
    authorizations: list[str | None] = dataclasses.field(default_factory=list)


def _stub_app(script: Script) -> Starlette:
    async def chat(request: Request) -> Response:
        script.calls += 1
        script.authorizations.append(request.headers.get("authorization"))
        if script.calls <= script.num_failures:
            return JSONResponse({"error": {"message": "overloaded"}}, 503, headers={"retry-after": "0"})
        await asyncio.sleep(script.delay_s)
        body = await request.json()
        message = {"role": "assistant", "content": f"echo {body['messages'][-1]['content']}"}
        return JSONResponse({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        })

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def scripted_upstream(script: Script) -> ServerThread:
    return ServerThread(_stub_app(script)).start()


def test_upstream_5xx_then_ok_is_retried(caplog: pytest.LogCaptureFixture, transport: str) -> None:
    caplog.set_level(logging.WARNING, logger="terse.backend.openai")
    script = Script(num_failures=2)
    stub = scripted_upstream(script)
    proxy = start_proxy(f"{stub.url}/v1", transport=transport)
    try:
        (via,) = clients(proxy)
        answer = via.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert answer.choices[0].message.content == "echo Where does Alice work?"
        assert script.calls == 3
        assert sum("HTTP 503" in r.message for r in caplog.records) == 2
        script.calls, script.num_failures = 0, 5  # more failures than retries: the client sees a 502
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=30)
        assert response.status_code == 502 and "overloaded" in response.json()["error"]["message"]
    finally:
        proxy.stop()
        stub.stop()


def test_slow_upstream_gives_504(transport: str) -> None:
    script = Script(delay_s=1.0)
    stub = scripted_upstream(script)
    proxy = start_proxy(f"{stub.url}/v1", timeout_s=0.2, transport=transport)
    try:
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=30)
        assert response.status_code == 504
        error = response.json()["error"]
        assert error["code"] == "upstream_timeout" and "did not answer in time" in error["message"]
        assert script.calls == 1  # a slow server is not hammered with retries
    finally:
        proxy.stop()
        stub.stop()


def test_keys_client_key_checked_upstream_key_sent(transport: str) -> None:
    script = Script()
    stub = scripted_upstream(script)
    guarded = start_proxy(f"{stub.url}/v1", api_key="terse-key", upstream_api_key="upstream-key", transport=transport)
    open_proxy = start_proxy(f"{stub.url}/v1", transport=transport)
    try:
        body = json.dumps({"model": "m", "messages": MESSAGES})
        url = f"{guarded.url}/v1/chat/completions"
        assert httpx.post(url, content=body, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert script.calls == 0  # rejected before anything went upstream
        ok = httpx.post(url, content=body, headers={"authorization": "Bearer terse-key"})
        assert ok.status_code == 200 and script.authorizations == ["Bearer upstream-key"]
        httpx.post(f"{open_proxy.url}/v1/chat/completions", content=body, headers={"authorization": "Bearer sk-user"})
        assert script.authorizations[-1] == "Bearer sk-user"  # transparent proxy: the client's key goes upstream
    finally:
        for server in (guarded, open_proxy, stub):
            server.stop()


def test_upstream_restart_between_requests_is_survived(transport: str) -> None:
    """A kept-alive connection the upstream closed (restart, idle timeout) is replaced, not reported."""
    first = scripted_upstream(Script())
    port = first.port
    proxy = start_proxy(f"http://127.0.0.1:{port}/v1", transport=transport)
    try:
        (via,) = clients(proxy)
        assert via.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
        first.stop()
        script = Script()
        second = ServerThread(_stub_app(script), port=port).start()
        try:
            answer = via.chat.completions.create(model="m", messages=MESSAGES)
            assert answer.choices[0].message.content == "echo Where does Alice work?" and script.calls == 1
        finally:
            second.stop()
    finally:
        proxy.stop()


def test_client_disconnect_through_the_proxy_cancels_upstream_generation(tiny_llama: Path, transport: str) -> None:
    from tests.pipelines.test_server import LONG, RecordingBackend, _wait_aborted

    backend = RecordingBackend(load_backend(f"hf:{tiny_llama}"))
    upstream = start_engine_server(backend)
    proxy = start_proxy(f"{upstream.url}/v1", transport=transport)
    try:
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=60) as r:
            assert next(r.iter_lines()).startswith("data: ")
        handle = _wait_aborted(backend, 0)  # proxy dropped its upstream connection; the engine stopped
        assert handle.result().finish_reason == "abort"
    finally:
        proxy.stop()
        upstream.stop()


def test_upstream_dying_mid_stream_ends_the_stream_with_an_error_event(transport: str) -> None:
    """An upstream that sends one SSE event and then drops the connection: the client gets that event,
    an OpenAI-shaped error event and [DONE], not a hung or truncated stream."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    event = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'

    def serve_once() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        conn.sendall(head + f"{len(event):x}\r\n".encode() + event + b"\r\n")
        conn.close()  # mid-body: no terminating chunk

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    proxy = start_proxy(f"http://127.0.0.1:{port}/v1", transport=transport)
    try:
        body = {"model": "m", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[0] == event.decode().strip()
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "upstream_unavailable"
        assert lines[-1] == "data: [DONE]"
    finally:
        proxy.stop()
        listener.close()
        thread.join(5)


def test_the_prompt_is_counted_while_the_upstream_works(caplog: pytest.LogCaptureFixture, transport: str) -> None:
    """With a tokenizer, the proxy counts the prompt alongside the upstream call: a counter that waits
    until the upstream has the request still ends up in the headers and `usage.terse` (counting first
    would time it out). A request that fails upstream leaves no unretrieved error behind."""
    import threading

    from terse.pipelines.server.app import create_app
    from terse.pipelines.server.hooks import HookChain
    from terse.pipelines.server.proxy import ProxyService

    arrived = threading.Event()
    fail = {"on": False}

    async def chat(request: Request) -> Response:
        arrived.set()
        if fail["on"]:
            return JSONResponse({"error": {"message": "overloaded"}}, 503, headers={"retry-after": "0"})
        body = await request.json()
        return JSONResponse({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        })

    def counter(messages: Any) -> int:
        waited = arrived.wait(timeout=10)
        return 1000 * len(messages) + (1 if waited else 0)  # ends in 1: the upstream had it first

    stub = ServerThread(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])).start()
    server_config = ServerConfig()
    hooks = HookChain((KeepLastUserMessage(),))
    service = ProxyService(ProxyConfig(upstream_url=f"{stub.url}/v1", retry=FAST_RETRY, transport=transport),
                           server_config, hooks)
    service.cheap_counting = False  # as with --tokenizer
    service.count_prompt_tokens = counter  # type: ignore[method-assign]
    proxy = ServerThread(create_app(service, server_config, hooks)).start()
    caplog.set_level(logging.ERROR, logger="asyncio")
    try:
        for stream in (False, True):
            arrived.clear()
            response = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                                  json={"model": "m", "messages": MESSAGES, "stream": stream})
            assert response.status_code == 200
            assert response.headers["x-terse-original-prompt-tokens"] == str(1000 * len(MESSAGES) + 1)
            assert response.headers["x-terse-sent-prompt-tokens"] == "1001"
            if not stream:
                assert response.json()["usage"]["terse"]["saved_prompt_tokens"] == 1000 * (len(MESSAGES) - 1)
        fail["on"] = True
        arrived.clear()
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=30)
        assert response.status_code == 502
    finally:
        proxy.stop()
        stub.stop()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
