"""OpenAIBackend against scripted HTTP servers (httpx.MockTransport): retries, SSE, usage, errors, scoring."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from terse.backend import SamplingParams, load_backend, openai_http
from terse.backend.openai import OpenAIBackend, OpenAIConfig
from terse.backend.openai_http import RetryPolicy, parse_retry_after
from terse.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    RemoteRequestError,
    UnsupportedOperationError,
)

BASE = "http://upstream.test/v1"
FAST_RETRY = RetryPolicy(max_retries=3, initial_backoff_s=0.001, max_backoff_s=0.004, jitter=0.0)


def sse(*events: dict[str, Any] | str) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return "".join(lines).encode()


def make_backend(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> OpenAIBackend:
    config = OpenAIConfig(base_url=BASE, model="m", retry=options.pop("retry", FAST_RETRY), **options)
    return OpenAIBackend(config, transport=httpx.MockTransport(handler))


def stream_ok(request: httpx.Request) -> httpx.Response:
    assert request.headers["x-request-id"].startswith("req-")
    body = json.loads(request.content)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    chat = request.url.path.endswith("chat/completions")
    pieces = ["Hel", "lo"]
    events: list[dict[str, Any] | str] = [
        {"choices": [{"index": 0, **({"delta": {"content": p}} if chat else {"text": p}), "finish_reason": None}]}
        for p in pieces
    ]
    events.append({"choices": [{"index": 0, "delta": {}, "text": "", "finish_reason": "length"}]})
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}
    events += [{"choices": [], "usage": usage}, "[DONE]"]
    return httpx.Response(200, content=sse(*events), headers={"content-type": "text/event-stream"})


def test_retry_after_parsing_seconds_and_http_date() -> None:
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 <= (parse_retry_after(format_datetime(when, usegmt=True)) or 0) <= 31


def test_backoff_doubles_with_bounded_jitter_and_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=4.0, jitter=0.25)
    for attempt, base in [(0, 1.0), (1, 2.0), (2, 4.0), (5, 4.0)]:
        delays = [policy.backoff_s(attempt) for _ in range(50)]
        assert all(0.75 * base <= d <= 1.25 * base for d in delays)
        assert len(set(delays)) > 1  # jitter spreads clients out
    assert policy.backoff_s(3, retry_after_s=7.0) == 7.0
    with pytest.raises(ConfigError, match="jitter"):
        RetryPolicy(jitter=1.5)


def test_streaming_completion_deltas_usage_and_cached_tokens() -> None:
    with make_backend(stream_ok) as backend:
        handle = backend.submit("Say hello", SamplingParams(max_tokens=2, stop=("\n",)))
        assert list(handle) == ["Hel", "lo"]
        done = handle.result(5)
        assert done.text == "Hello" and done.finish_reason == "length"
        assert (done.usage.prompt_tokens, done.usage.cached_prompt_tokens, done.usage.completion_tokens) == (7, 4, 2)
        chat = backend.submit_chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2)).result(5)
        assert chat.text == "Hello"


def test_503_then_success_is_retried_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, json={"error": {"message": "busy"}}) if len(calls) < 3 else stream_ok(request)

    caplog.set_level(logging.WARNING, logger="terse.backend.openai")
    with make_backend(handler) as backend:
        assert backend.submit("x", SamplingParams(max_tokens=2)).result(5).text == "Hello"
    assert len(calls) == 3
    assert sum("retrying" in r.message and "HTTP 503" in r.message for r in caplog.records) == 2


def test_429_honours_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(openai_http.time, "sleep", slept.append)
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(429, headers={"retry-after": "1.5"}, json={"error": {"message": "slow down"}})
        return stream_ok(request)

    with make_backend(handler) as backend:
        assert backend.submit("x", SamplingParams(max_tokens=2)).result(5).text == "Hello"
    assert slept == [1.5]


def test_connection_errors_exhaust_retries() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    with make_backend(handler) as backend, pytest.raises(BackendUnavailableError, match="4 attempt"):
        backend.submit("x", SamplingParams(max_tokens=2)).result(5)
    assert len(calls) == 4  # first attempt + max_retries


def test_read_timeout_is_typed_and_not_retried() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ReadTimeout("timed out", request=request)

    with make_backend(handler) as backend, pytest.raises(BackendTimeoutError, match="timeout_s"):
        backend.submit("x", SamplingParams(max_tokens=2)).result(5)
    assert len(calls) == 1


def test_4xx_raises_with_server_message_and_no_retry() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        err = {"message": "max_tokens is too large", "type": "invalid_request_error", "param": "max_tokens"}
        return httpx.Response(400, json={"error": err})

    with make_backend(handler) as backend, pytest.raises(RemoteRequestError, match="too large") as info:
        backend.submit("x", SamplingParams(max_tokens=2)).result(5)
    assert info.value.status_code == 400 and info.value.param == "max_tokens"
    assert len(calls) == 1


def test_mid_stream_error_event_fails_the_handle_without_retry() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        body = sse({"choices": [{"index": 0, "text": "par"}]}, {"error": {"message": "engine died"}})
        return httpx.Response(200, content=body)

    with make_backend(handler) as backend, pytest.raises(BackendUnavailableError, match="engine died"):
        backend.submit("x", SamplingParams(max_tokens=2)).result(5)
    assert len(calls) == 1


def test_concurrency_is_bounded() -> None:
    lock = threading.Lock()
    in_flight = [0, 0]  # now, peak

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return stream_ok(request)

    with make_backend(handler, max_concurrency=2) as backend:
        results = backend.generate(["a"] * 8, SamplingParams(max_tokens=2))
    assert [r.text for r in results] == ["Hello"] * 8
    assert in_flight[1] == 2


def test_score_via_echo_logprobs_and_unsupported_servers() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert (body["echo"], body["logprobs"], body["max_tokens"]) == (True, 0, 0)
        assert body["prompt"] == "Q: ab"
        logprobs = {
            "tokens": ["<s>", "Q:", " a", "b"],
            "token_logprobs": [None, -1.0, -2.0, -3.0],
            "text_offset": [0, 0, 2, 4],
            "token_ids": [1, 10, 11, 12],
        }
        return httpx.Response(200, json={"choices": [{"text": "Q: ab", "logprobs": logprobs}]})

    with make_backend(handler) as backend:
        (scores,) = backend.score([" ab"], prefix="Q:")
        assert scores.token_ids == (11, 12) and scores.logprobs == (-2.0, -3.0)
        assert scores.offsets == ((0, 2), (2, 3))
        (whole,) = backend.score(["Q: ab"])
        assert whole.token_ids == (10, 11, 12)  # the zero-width BOS is not part of the text
        assert not math.isnan(whole.logprobs[0])

    refuse = lambda r: httpx.Response(400, json={"error": {"message": "echo is not supported"}})
    with make_backend(refuse) as backend, pytest.raises(UnsupportedOperationError, match="echo is not supported"):
        backend.score(["ab"])


def test_token_counting_strategies() -> None:
    def no_tokenize(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    with make_backend(no_tokenize) as backend:
        assert backend.tokenizer.kind == "approx"
        assert backend.count_tokens("x" * 10) == 3
        with pytest.raises(UnsupportedOperationError, match="tokenizer="):
            backend.encode("abc")

    def tokenize(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/tokenize"  # at the server root, beside /v1
        return httpx.Response(200, json={"tokens": list(range(len(json.loads(request.content)["prompt"])))})

    with make_backend(tokenize) as backend:
        assert backend.tokenizer.kind == "server"
        assert backend.count_tokens("abcde") == 5


def test_from_spec_api_key_env_and_model_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"data": [{"id": "only-model", "max_model_len": 2048}]})

    monkeypatch.setenv("TERSE_OPENAI_API_KEY", "sk-env")
    transport = httpx.MockTransport(handler)
    backend = OpenAIBackend.from_spec(BASE, transport=transport)
    assert backend.model_name == "only-model" and backend.max_model_len == 2048
    assert seen and set(seen) == {"Bearer sk-env"}
    backend.close()
    spec_backend = load_backend(f"openai:{BASE}#named", api_key="sk-arg", transport=transport)
    assert spec_backend.model_name == "named"
    spec_backend.close()
    with pytest.raises(ConfigError, match="unknown OpenAIBackend option"):
        OpenAIBackend.from_spec(f"{BASE}#m", max_concurency=3)
    with pytest.raises(ConfigError, match="http://"):
        OpenAIBackend.from_spec("localhost:8000/v1#m")


def test_invalid_requests_fail_at_submit() -> None:
    with make_backend(stream_ok) as backend:
        with pytest.raises(InvalidRequestError, match="empty"):
            backend.submit("", SamplingParams())
        with pytest.raises(InvalidRequestError, match="messages"):
            backend.submit_chat([], SamplingParams())
