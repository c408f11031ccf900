"""Fault injection over HTTP: malformed requests must be 400s logged as one line (never a 500 or a
traceback), and a broken upstream must reach the client as a clear 502 or a well-formed error event.

The engine-mode server runs the local engine on the tiny model with a 16-block pool; the broken
upstreams are raw sockets that answer with canned bytes (HTML pages, empty or truncated bodies, SSE
streams that are garbled or cut off mid-event).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from terse.backend import load_backend
from terse.pipelines.server import ServerThread
from tests.pipelines.test_server import MODEL, start_engine_server
from tests.pipelines.test_server_proxy import start_proxy

NUM_KV_BLOCKS = 16  # x 16-token blocks: 256 tokens of KV for the whole pool
MESSAGES = [{"role": "user", "content": "Where does Alice work?"}]


class Records(logging.Handler):
    """Every record logged on the server's and uvicorn's loggers while attached."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_log() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("terse.server", "uvicorn.error")]
    levels = [lg.level for lg in loggers]
    loggers[0].setLevel(logging.INFO)
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


@pytest.fixture(scope="module")
def engine_server(tiny_llama: Path) -> Iterator[ServerThread]:
    backend = load_backend(f"local:{tiny_llama}", num_kv_blocks=NUM_KV_BLOCKS, kv_block_size=16)
    server = start_engine_server(backend)
    yield server
    server.stop()
    backend.close()


def _chat(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}).encode()


DEEP = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
NESTED_200 = b'{"model": "tiny", "messages": [], "x": ' + b"[" * 200 + b"]" * 200 + b"}"
SURROGATE = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800x"}], "max_tokens": 2}'
SURROGATE_KEY = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi", "\\udfff": 1}]}'

MALFORMED = [  # (route, body, status, code, param)
    ("/v1/chat/completions", DEEP, 400, "invalid_json", None),
    ("/v1/chat/completions", NESTED_200, 400, "invalid_json", None),
    ("/v1/chat/completions", SURROGATE, 400, "invalid_json", "messages[0].content"),
    ("/v1/chat/completions", SURROGATE_KEY, 400, "invalid_json", "messages[0]"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "\\udc00", "max_tokens": 2}', 400, "invalid_json", "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny", "n": ' + b"9" * 5000 + b"}", 400, "invalid_json", None),
    ("/v1/chat/completions", _chat(seed=2**70), 400, "invalid_value", "seed"),
    ("/v1/chat/completions", _chat(seed=-(2**63) - 1), 400, "invalid_value", "seed"),
    ("/v1/chat/completions", _chat(top_p=10**400), 400, "invalid_value", "top_p"),
    ("/detokenize", b'{"tokens": [-1]}', 400, "invalid_request", "tokens"),
    ("/detokenize", json.dumps({"tokens": [5, 2**40]}).encode(), 400, "invalid_request", "tokens"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "hello " * 3000}).encode(), 400,
     "context_length_exceeded", "prompt"),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 2, 99999]}).encode(), 400, "invalid_request", "prompt"),
    ("/v1/chat/completions", _chat(max_tokens=300), 400, "invalid_request", "max_tokens"),  # > the KV pool
]


@pytest.mark.parametrize("route,body,status,code,param", MALFORMED, ids=[f"{i}" for i in range(len(MALFORMED))])
def test_malformed_requests_are_400s_logged_as_one_line(
    engine_server: ServerThread, server_log: Records, route: str, body: bytes, status: int, code: str,
    param: str | None,
) -> None:
    response = httpx.post(f"{engine_server.url}{route}", content=body, headers={"x-request-id": "bad-1"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    lines = [r for r in server_log.records if "bad-1" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and lines[0].exc_info is None
    assert not [r for r in server_log.records if r.name == "uvicorn.error" or r.exc_info], "no tracebacks"


def test_valid_edge_values_are_served(engine_server: ServerThread) -> None:
    pair = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'
    assert httpx.post(f"{engine_server.url}/v1/chat/completions", content=pair, timeout=60).status_code == 200
    top = httpx.post(f"{engine_server.url}/v1/chat/completions", content=_chat(seed=2**63 - 1, n=2), timeout=60)
    assert top.status_code == 200 and len(top.json()["choices"]) == 2  # choice 1's seed wraps around
    assert httpx.post(f"{engine_server.url}/detokenize", json={"tokens": [5, 6]}, timeout=60).status_code == 200


def test_default_max_tokens_is_capped_by_the_kv_pool(engine_server: ServerThread) -> None:
    pool_tokens = NUM_KV_BLOCKS * 16
    chat = httpx.post(f"{engine_server.url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": MESSAGES, "temperature": 0, "ignore_eos": True})  # default: 1024
    assert chat.status_code == 200, chat.text
    usage = chat.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == pool_tokens
    assert chat.json()["choices"][0]["finish_reason"] == "length"
    prompt = [5] * (pool_tokens - 6)  # + the default 16 would not fit
    completion = httpx.post(f"{engine_server.url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "temperature": 0, "ignore_eos": True})
    assert completion.status_code == 200, completion.text
    usage = completion.json()["usage"]
    assert 1 <= usage["completion_tokens"] < 16 and usage["prompt_tokens"] + usage["completion_tokens"] <= pool_tokens


def test_dropped_stream_is_logged_once(engine_server: ServerThread, server_log: Records) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    url = f"{engine_server.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers={"x-request-id": "gone-1"}, timeout=60) as response:
        assert next(response.iter_lines()).startswith("data: ")
    for _ in range(200):
        if any("gone-1" in r.getMessage() for r in server_log.records):
            break
        threading.Event().wait(0.02)
    lines = [r.getMessage() for r in server_log.records if "gone-1" in r.getMessage()]
    assert len(lines) == 1 and "disconnected mid-stream" in lines[0]


def test_client_gone_mid_body_is_one_line(engine_server: ServerThread, server_log: Records) -> None:
    with socket.create_connection(("127.0.0.1", engine_server.port)) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n"
                     b"x-request-id: half-1\r\n\r\n{\"model\": ")
        threading.Event().wait(0.2)
    for _ in range(200):
        if any("half-1" in r.getMessage() for r in server_log.records):
            break
        threading.Event().wait(0.02)
    lines = [r.getMessage() for r in server_log.records if "half-1" in r.getMessage()]
    assert len(lines) == 1 and "disconnected before its request body arrived" in lines[0]
    assert not [r for r in server_log.records if r.name == "uvicorn.error" or r.exc_info], "no tracebacks"


# -- broken upstreams ------------------------------------------------------------------------------


class RawUpstream:
    """A TCP server answering every request with `self.response` (raw bytes), then closing."""

    def __init__(self) -> None:
        self.response = b""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/v1"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(self.response)

    def close(self) -> None:
        self._listener.close()


def _http(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


def _chunked(content_type: str, chunks: list[bytes], *, finish: bool) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
    body = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks)
    return head + body + (b"0\r\n\r\n" if finish else b"")  # not finished: the connection just closes


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream()
    yield upstream
    upstream.close()


@pytest.fixture(scope="module", params=["h11", "httpx"])
def broken_proxy(raw_upstream: RawUpstream, request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    proxy = start_proxy(raw_upstream.url, transport=str(request.param))
    yield proxy
    proxy.stop()


NOT_JSON = [  # (upstream answer, status the client gets, words its message holds)
    (_http("200 OK", "text/html", b"<html><body><h1>Welcome to nginx!</h1></body></html>"), 502, ["HTTP 200", "nginx"]),
    (_http("200 OK", "application/json", b""), 502, ["HTTP 200", "0 bytes"]),
    (_http("200 OK", "application/json", b'{"id": "chatcmpl-1", "choi'), 502, ["HTTP 200", "chatcmpl-1"]),
    (_http("404 Not Found", "text/html", b"<h1>404 page not found</h1>"), 404, ["HTTP 404", "page not found"]),
]


@pytest.mark.parametrize("answer,status,words", NOT_JSON, ids=["html", "empty", "truncated", "html-404"])
def test_upstream_answers_that_are_not_json_become_clear_errors(
    raw_upstream: RawUpstream, broken_proxy: ServerThread, answer: bytes, status: int, words: list[str]
) -> None:
    raw_upstream.response = answer
    response = httpx.post(f"{broken_proxy.url}/v1/chat/completions", content=_chat(), timeout=30)
    assert response.status_code == status and response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert all(w in error["message"] for w in words), error
    if status == 502:
        assert error["code"] == "upstream_invalid_response"


EVENT = b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
BROKEN_STREAMS = {  # name -> (upstream answer, events passed on before the error)
    "no-done": (_chunked("text/event-stream", [EVENT, EVENT], finish=True), 2),
    "empty": (_chunked("text/event-stream", [], finish=True), 0),
    "not-sse": (_chunked("text/event-stream", [EVENT, b"<html>oops</html>\n\n"], finish=True), 1),
    "not-json": (_chunked("text/event-stream", [EVENT, b'data: {"choi\n\n', b"data: [DONE]\n\n"], finish=True), 1),
    "cut-mid-event": (_chunked("text/event-stream", [EVENT + EVENT[:30]], finish=False), 1),
    "cut-crlf": (_chunked("text/event-stream", [EVENT.replace(b"\n", b"\r\n"), b"data: {"], finish=True), 1),
}


@pytest.mark.parametrize("name", sorted(BROKEN_STREAMS))
def test_broken_streams_end_with_a_separate_error_event_and_done(
    raw_upstream: RawUpstream, broken_proxy: ServerThread, name: str
) -> None:
    raw_upstream.response, num_good = BROKEN_STREAMS[name]
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{broken_proxy.url}/v1/chat/completions", json=body, timeout=30) as response:
        raw = response.read()
    events = [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    assert len(events) == num_good + 2, raw  # the good events, one error event, [DONE]
    assert all(e == EVENT.strip() for e in events[:num_good])
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    if name == "cut-mid-event":  # the connection itself broke
        assert error["code"] == "upstream_unavailable" and "broke off the response" in error["message"]
    else:
        assert error["code"] == "upstream_invalid_response" and "broken stream" in error["message"]
    assert events[-1] == b"data: [DONE]" and raw.endswith(b"\n\ndata: [DONE]\n\n")


def test_openai_client_sees_the_error_of_a_stream_cut_mid_event(
    raw_upstream: RawUpstream, broken_proxy: ServerThread
) -> None:
    raw_upstream.response = BROKEN_STREAMS["cut-mid-event"][0]
    client = openai.OpenAI(api_key="unused", base_url=f"{broken_proxy.url}/v1", max_retries=0, timeout=30)
    texts: list[str] = []
    with pytest.raises(openai.APIError, match="broke off the response"):
        for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            texts.append(chunk.choices[0].delta.content or "")
    assert texts == ["Hel"]


def test_a_good_stream_passes_unchanged(raw_upstream: RawUpstream, broken_proxy: ServerThread) -> None:
    good = [EVENT, b": keep-alive comment\n\n", EVENT.replace(b"\n", b"\r\n"), b"data: [DONE]\n\n"]
    raw_upstream.response = _chunked("text/event-stream", good, finish=True)
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{broken_proxy.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.read() == b"".join(good)
