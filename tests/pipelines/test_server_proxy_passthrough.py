"""Proxy mode forwards what it does not handle unchanged (endpoints, fields, bodies, queries, streams) and
its /health reports the upstream's state."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from terse.pipelines.server import ServerThread
from tests.pipelines.test_server_proxy import start_proxy

SEEN: list[dict[str, Any]] = []


async def _echo(request: Request) -> Response:
    body = await request.body()
    SEEN.append({
        "method": request.method, "path": request.url.path, "query": request.url.query,
        "content_type": request.headers.get("content-type"), "body": body,
    })
    if request.url.path == "/v1/responses":
        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {json.dumps({'i': i})}\n\n".encode()
        return StreamingResponse(events(), media_type="text/event-stream")
    if request.url.path == "/v1/chat/completions":
        message = {"role": "assistant", "content": "ok"}
        return JSONResponse({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                             "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
    return JSONResponse({"echo": request.url.path}, status_code=201 if request.method == "PUT" else 200)


@pytest.fixture(scope="module")
def proxy() -> Iterator[ServerThread]:
    upstream = ServerThread(Starlette(routes=[
        Route("/v1/{rest:path}", _echo, methods=["GET", "POST", "PUT", "DELETE"]),
    ])).start()
    server = start_proxy(f"{upstream.url}/v1")
    yield server
    server.stop()
    upstream.stop()


@pytest.mark.parametrize(("method", "path", "content", "content_type"), [
    ("POST", "/v1/embeddings", b'{"model":"e","input":["a"],"dimensions":8}', "application/json"),
    ("GET", "/v1/models/some-model", b"", None),
    ("POST", "/v1/audio/transcriptions?lang=en", b"--b\r\nContent-Disposition: form-data; name=f\r\n\r\nx\r\n--b--",
     "multipart/form-data; boundary=b"),
    ("PUT", "/v1/files/abc?purpose=batch", b"\x00\x01binary", "application/octet-stream"),
    ("DELETE", "/v1/files/abc", b"", None),
])
def test_unhandled_endpoints_go_upstream_unchanged(
    proxy: ServerThread, method: str, path: str, content: bytes, content_type: str | None
) -> None:
    SEEN.clear()
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.request(method, f"{proxy.url}{path}", content=content, headers=headers, timeout=30)
    assert response.status_code == (201 if method == "PUT" else 200)
    (seen,) = SEEN
    want_path, _, want_query = path.partition("?")
    assert (seen["method"], seen["path"], seen["query"]) == (method, want_path, want_query)
    assert seen["body"] == content
    if content_type:
        assert seen["content_type"] == content_type
    assert response.headers["x-request-id"]


def test_fields_terse_does_not_handle_are_forwarded_as_sent(proxy: ServerThread) -> None:
    SEEN.clear()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "bob"}], "logit_bias": {"5": 1},
            "top_k": 3, "tools": [{"type": "function", "function": {"name": "f"}}], "frequency_penalty": 0.5}
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200
    assert json.loads(SEEN[0]["body"]) == body


def test_unhandled_streams_are_relayed(proxy: ServerThread) -> None:
    with httpx.stream("POST", f"{proxy.url}/v1/responses", json={"stream": True}, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines == [f"data: {json.dumps({'i': i})}" for i in range(3)]


def test_health_is_ok_while_the_upstream_answers(proxy: ServerThread) -> None:
    health = httpx.get(f"{proxy.url}/health", timeout=30)
    assert health.status_code == 200
    assert health.json()["upstream"]["status"] == "ok" and health.json()["upstream"]["http_status"] == 200


def test_rewritten_messages_keep_their_other_fields() -> None:
    from terse.pipelines.server.config import ServerConfig
    from terse.pipelines.server.schema import parse_chat

    raw = [{"role": "developer", "content": "rules"}, {"role": "user", "content": "long text", "name": "bob"}]
    request = parse_chat({"model": "m", "messages": raw}, ServerConfig())
    assert request.upstream_body()["messages"] == raw  # untouched: exactly as sent
    shorter = request.with_messages((request.messages[0], {"role": "user", "content": "short"}))
    assert shorter.upstream_body()["messages"] == [raw[0], {"role": "user", "content": "short", "name": "bob"}]
    dropped = request.with_messages(request.messages[1:])
    assert dropped.upstream_body()["messages"] == [raw[1]]  # a message kept as it was keeps every field
