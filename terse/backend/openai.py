"""`OpenAIBackend`: the Backend contract over any OpenAI-compatible HTTP API (OpenAI, vLLM, SGLang,
llama.cpp, `terse serve`).

- `submit(prompt)` -> POST /v1/completions; `submit_chat(messages)` -> POST /v1/chat/completions.
  Chat keeps the server's template: without a local tokenizer that has one, `render_chat()` returns a
  `RenderedChat` and `submit()` sends its messages to /v1/chat/completions (so `generate([render_chat(m)])`
  answers as the served model's template makes it); with one, the rendered prompt goes to /v1/completions.
  Requests stream by default (SSE); every text delta reaches `RequestHandle.emit` as it arrives.
- Usage comes from the server (`stream_options.include_usage`), including
  `usage.prompt_tokens_details.cached_tokens` -> `Usage.cached_prompt_tokens`; a server that reports none
  gets counts from this backend's tokenizer strategy (see `terse.backend.openai_tokens`).
- `score()` -> /v1/completions with `echo=true, logprobs=0, max_tokens=0` (prompt log-probabilities);
  servers that refuse raise `UnsupportedOperationError`. Token ids come from the response's
  `logprobs.token_ids` when the server sends them (terse does), else they are -1 (unknown).
- Failures before the first byte (connection errors, 429, 5xx) are retried with exponential backoff and
  jitter, honouring Retry-After (`RetryPolicy`); a 4xx raises `RemoteRequestError` with the server's message.
- Concurrency is bounded: at most `max_concurrency` requests run at once (a worker pool of that size over
  one pooled `httpx.Client`); later submits queue.
- `Completion.token_ids` are the local tokenizer's encoding of the text when a tokenizer is given, else ().
- `handle.cancel()` takes effect at the next SSE event (the stream is then closed, which a terse or
  vLLM server sees as a disconnect and stops generating); a request still queued is never sent.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any

import httpx

from terse.backend.base import BackendBase
from terse.backend.handle import RequestHandle
from terse.backend.openai_http import RetryPolicy, error_from_response, iter_sse_data, send_with_retries
from terse.backend.openai_structured import ToolCallText, message_text, structured_payload
from terse.backend.openai_tokens import RemoteTokenizer, RenderedChat, pick_tokenizer
from terse.backend.types import Completion, FinishReason, Message, SamplingParams, TokenScores, Usage
from terse.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    RemoteRequestError,
    UnsupportedOperationError,
)

API_KEY_ENV_VARS = ("TERSE_OPENAI_API_KEY", "OPENAI_API_KEY")


@dataclass(frozen=True)
class OpenAIConfig:
    """Where the server is and how to talk to it."""

    base_url: str
    """API root including the version path, e.g. "http://127.0.0.1:8000/v1"."""
    model: str
    """Model id sent in every request (as listed by the server's /v1/models)."""
    api_key: str | None = None
    """Bearer token; None sends no Authorization header."""
    tokenizer: str | None = None
    """Path or hub name of the served model's tokenizer for exact local counts; None: server or estimate."""
    probe_tokenize_endpoint: bool = True
    """Without a local tokenizer, try the server's /tokenize before falling back to the estimate."""
    max_model_len: int | None = None
    """Context length; None asks /v1/models (vLLM and terse report `max_model_len` there)."""
    max_concurrency: int = 16
    """Most requests in flight at once; further submits wait their turn."""
    timeout_s: float = 120.0
    """Longest wait for any byte of a response (read timeout), in seconds."""
    connect_timeout_s: float = 5.0
    """Longest wait to open a connection, in seconds."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Backoff for failures before the first response byte."""
    stream: bool = True
    """Stream responses (SSE) so deltas reach the handle early; False waits for whole responses."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url={self.base_url!r} must start with http:// or https://")
        if not self.model:
            raise ConfigError("model must be a non-empty model id, e.g. 'openai:http://host:8000/v1#my-model'")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency={self.max_concurrency} must be >= 1")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ConfigError(
                f"timeouts must be > 0 (timeout_s={self.timeout_s}, connect_timeout_s={self.connect_timeout_s})"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len={self.max_model_len} must be >= 1 or None")


def _map_finish_reason(reason: object, cancelled: bool) -> FinishReason:
    if cancelled:
        return "abort"
    return "length" if reason == "length" else "stop"


class OpenAIBackend(BackendBase):
    """Backend over an OpenAI-compatible server. See the module docstring for what maps to what."""

    def __init__(self, config: OpenAIConfig, *, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency),
            transport=transport,
        )
        self._pool = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="terse-openai")
        self._base_url = config.base_url.rstrip("/")
        self._lock = threading.Lock()
        self._tokenizer: RemoteTokenizer | None = None
        self._max_model_len = config.max_model_len

    @classmethod
    def from_spec(cls, target: str, api_key: str | None = None, **options: Any) -> OpenAIBackend:
        """Build from `"<base_url>#<model>"` (the part after `openai:`); options are `OpenAIConfig` fields.

        The API key is `api_key`, else env TERSE_OPENAI_API_KEY, else OPENAI_API_KEY. Without `#<model>`
        the server's /v1/models must list exactly one model, which is used.
        """
        base_url, _, model = target.partition("#")
        allowed = {f.name for f in fields(OpenAIConfig)} - {"base_url", "model", "api_key"} | {"transport"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"unknown OpenAIBackend option(s) {unknown}; known: {sorted(allowed)}")
        if api_key is None:
            api_key = next((os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)), None)
        transport = options.pop("transport", None)
        if not model:
            model = cls._only_model(base_url, api_key, transport)
        return cls(OpenAIConfig(base_url=base_url, model=model, api_key=api_key, **options), transport=transport)

    @staticmethod
    def _only_model(base_url: str, api_key: str | None, transport: httpx.BaseTransport | None) -> str:
        probe = OpenAIBackend(OpenAIConfig(base_url=base_url, model="?", api_key=api_key), transport=transport)
        try:
            ids = [str(m.get("id")) for m in probe.list_models() if m.get("kind") != "embedding"]
        finally:
            probe.close()
        if len(ids) != 1:
            raise ConfigError(
                f"spec 'openai:{base_url}' names no model and the server lists {ids}; "
                f"add '#<model id>', e.g. 'openai:{base_url}#{ids[0] if ids else 'my-model'}'"
            )
        return ids[0]

    # -- properties ------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def max_model_len(self) -> int:
        if self._max_model_len is None:
            for entry in self.list_models():
                if entry.get("id") == self.config.model and isinstance(entry.get("max_model_len"), int):
                    self._max_model_len = int(entry["max_model_len"])
            if self._max_model_len is None:
                raise UnsupportedOperationError(
                    f"{self._base_url}/models does not report max_model_len for {self.config.model!r}; "
                    f"pass max_model_len=<context length> to OpenAIBackend"
                )
        return self._max_model_len

    @property
    def tokenizer(self) -> RemoteTokenizer:
        """The token-count strategy in use (`.kind` is "local", "server" or "approx")."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = pick_tokenizer(
                    self.config.tokenizer,
                    probe_server=self.config.probe_tokenize_endpoint,
                    post=self._post_json,
                    root_url=self._base_url.removesuffix("/v1"),
                    model=self.config.model,
                )
            return self._tokenizer

    # -- plain JSON calls --------------------------------------------------------------------------
    def _post_json(self, url: str, payload: dict[str, Any], request_id: str | None = None) -> dict[str, Any]:
        return self._call("POST", url, payload, request_id)

    def _call(
        self, method: str, url: str, payload: dict[str, Any] | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        headers = {"x-request-id": request_id} if request_id else None
        request = self._client.build_request(method, url, json=payload, headers=headers)
        response = send_with_retries(self._client, request, self.config.retry)
        try:
            response.read()
        except httpx.TimeoutException as e:
            raise BackendTimeoutError(f"{url} stopped answering mid-response; raise timeout_s") from e
        finally:
            response.close()
        if response.status_code >= 400:
            raise error_from_response(response)
        body: dict[str, Any] = response.json()
        return body

    def list_models(self) -> list[dict[str, Any]]:
        """The server's /v1/models entries (each at least {"id": ...})."""
        data = self._call("GET", f"{self._base_url}/models").get("data", [])
        return [m for m in data if isinstance(m, dict)]

    # -- generation --------------------------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestHandle:
        """Start a /v1/completions request (a token-id prompt is sent as a list of ints); a `RenderedChat`
        from `render_chat()` starts a /v1/chat/completions request with its messages instead."""
        if isinstance(prompt, RenderedChat):
            return self.submit_chat(prompt.messages, params)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty; give at least one character or token id")
            body_prompt: str | list[int] = prompt
        else:
            body_prompt = [int(t) for t in prompt]
            if not body_prompt:
                raise InvalidRequestError("prompt is an empty token-id list; give at least one id")
        return self._start("completions", {"prompt": body_prompt}, params, chat=False)

    def submit_chat(self, messages: Sequence[Message], params: SamplingParams) -> RequestHandle:
        """Start a /v1/chat/completions request; the server applies its own chat template."""
        if not messages:
            raise InvalidRequestError("messages is empty; give at least one {'role', 'content'} message")
        return self._start("chat/completions", {"messages": [dict(m) for m in messages]}, params, chat=True)

    def _start(self, path: str, body: dict[str, Any], params: SamplingParams, *, chat: bool) -> RequestHandle:
        if params.streaming_kv is not None:
            raise InvalidRequestError(
                "streaming_kv is honoured only by the local engine; remove it for an openai: backend"
            )
        if params.logprobs is not None:
            raise InvalidRequestError(
                "logprobs of generated tokens are not available through an openai: backend (a server names "
                "tokens by text, not id); use a local: or hf: backend, or the server's own logprobs field"
            )
        payload: dict[str, Any] = {"model": self.config.model, **body, **_sampling_payload(params)}
        handle = RequestHandle(f"req-{uuid.uuid4().hex[:12]}")
        self._pool.submit(self._run, handle, f"{self._base_url}/{path}", payload, chat)
        return handle

    def _run(self, handle: RequestHandle, url: str, payload: dict[str, Any], chat: bool) -> None:
        t0 = time.perf_counter()
        try:
            if handle.cancel_requested:
                completion = Completion("", (), "abort", Usage(0, 0, 0))
            elif self.config.stream:
                completion = self._run_streaming(handle, url, payload, chat, t0)
            else:
                completion = self._run_whole(handle, url, payload, chat, t0)
        except Exception as e:  # the handle carries the failure to whoever waits on it
            handle.fail(e)
            return
        handle.finish(completion)

    def _run_streaming(
        self, handle: RequestHandle, url: str, payload: dict[str, Any], chat: bool, t0: float
    ) -> Completion:
        payload = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        # the handle's id travels as x-request-id, so server logs and this process name the same request
        request = self._client.build_request("POST", url, json=payload, headers={"x-request-id": handle.request_id})
        response = send_with_retries(self._client, request, self.config.retry)
        pieces: list[str] = []
        reason: object = None
        usage: dict[str, Any] | None = None
        ttft: float | None = None
        calls = ToolCallText()  # tool-call deltas -> tool-call text (openai_structured.py)
        try:
            if response.status_code >= 400:
                response.read()
                raise error_from_response(response)
            for event in iter_sse_data(response):
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    delta = calls.push(choice.get("delta") or {}) if chat else choice.get("text")
                    if delta:
                        ttft = time.perf_counter() - t0 if ttft is None else ttft
                        pieces.append(delta)
                        handle.emit(delta)
                    reason = choice.get("finish_reason") or reason
                if handle.cancel_requested:
                    break
        except httpx.TimeoutException as e:
            raise BackendTimeoutError(f"{url} stopped streaming for over {self.config.timeout_s} s") from e
        except httpx.HTTPError as e:
            raise BackendUnavailableError(f"{url} broke off the stream: {type(e).__name__}: {e}") from e
        finally:
            response.close()
        if trailer := calls.close():
            pieces.append(trailer)
            handle.emit(trailer)
        metrics = {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "latency": time.perf_counter() - t0}
        return self._completion("".join(pieces), reason, handle.cancel_requested, usage, payload, metrics)

    def _run_whole(
        self, handle: RequestHandle, url: str, payload: dict[str, Any], chat: bool, t0: float
    ) -> Completion:
        body = self._post_json(url, payload, handle.request_id)
        choice = (body.get("choices") or [{}])[0]
        text = (message_text(choice.get("message") or {}) if chat else choice.get("text")) or ""
        handle.emit(text)
        latency = time.perf_counter() - t0
        metrics = {"ttft": latency, "latency": latency}
        return self._completion(text, choice.get("finish_reason"), False, body.get("usage"), payload, metrics)

    def _completion(
        self,
        text: str,
        reason: object,
        cancelled: bool,
        usage: dict[str, Any] | None,
        payload: dict[str, Any],
        metrics: dict[str, float],
    ) -> Completion:
        # ids only from a local tokenizer: asking the server for them would cost a round trip per request
        token_ids = tuple(self.encode(text)) if self.config.tokenizer is not None else ()
        return Completion(
            text, token_ids, _map_finish_reason(reason, cancelled), self._usage(usage, payload, text), metrics
        )

    def _usage(self, usage: dict[str, Any] | None, payload: dict[str, Any], text: str) -> Usage:
        if usage and isinstance(usage.get("prompt_tokens"), int):
            details = usage.get("prompt_tokens_details") or {}
            return Usage(
                prompt_tokens=int(usage["prompt_tokens"]),
                cached_prompt_tokens=int(details.get("cached_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
        # the server reported nothing: count with our own strategy (exact or estimated, see module doc)
        if "messages" in payload:
            num_prompt = self.count_tokens(self.render_chat(payload["messages"]))
        elif isinstance(payload["prompt"], list):
            num_prompt = len(payload["prompt"])
        else:
            num_prompt = self.count_tokens(payload["prompt"])
        return Usage(num_prompt, 0, self.count_tokens(text) if text else 0)

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, texts: Sequence[str], *, prefix: str = "") -> list[TokenScores]:
        """Prompt log-probabilities via /v1/completions echo; see the module docstring."""
        return list(self._pool.map(lambda t: self._score_one(t, prefix), texts))

    def _score_one(self, text: str, prefix: str) -> TokenScores:
        full = prefix + text
        payload = {"model": self.config.model, "prompt": full, "echo": True, "logprobs": 0, "max_tokens": 0}
        try:
            body = self._post_json(f"{self._base_url}/completions", payload)
        except RemoteRequestError as e:
            raise UnsupportedOperationError(
                f"{self._base_url} does not return prompt logprobs (echo=true, logprobs=0, max_tokens=0): {e}"
            ) from e
        logprobs = ((body.get("choices") or [{}])[0]).get("logprobs")
        if not isinstance(logprobs, dict) or not logprobs.get("token_logprobs"):
            raise UnsupportedOperationError(
                f"{self._base_url} answered an echo/logprobs request without prompt logprobs; score() needs "
                f"a server that returns them (vLLM, terse serve)"
            )
        return _scores_of_text(logprobs, len(prefix), len(full))

    # -- tokens and templates ----------------------------------------------------------------------
    def render_chat(self, messages: Sequence[Message]) -> str:
        """The local tokenizer's chat template when one is configured (the prompt then goes to
        /v1/completions); else a `RenderedChat`, which `submit()` sends to /v1/chat/completions so the
        server applies the model's own template."""
        rendered = self.tokenizer.render_chat(messages)
        return rendered if rendered is not None else RenderedChat(messages)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text`; of a `RenderedChat`, under the server's template when the server can tell."""
        if isinstance(text, RenderedChat):
            exact = self.tokenizer.count_chat(text.messages)
            if exact is not None:
                return exact
        return self.tokenizer.count_tokens(text)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()


def _sampling_payload(params: SamplingParams) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
    }
    if params.stop:
        payload["stop"] = list(params.stop)
    if params.seed is not None:
        payload["seed"] = params.seed
    if params.ignore_eos:
        payload["ignore_eos"] = True  # vLLM / SGLang / terse extension
    payload.update(structured_payload(params.constraint))  # response_format / tools / structured_outputs
    return payload


def _scores_of_text(logprobs: dict[str, Any], prefix_len: int, full_len: int) -> TokenScores:
    """Keep the tokens of the scored text (offset >= prefix_len), dropping a zero-width leading BOS."""
    offsets: list[int] = [int(o) for o in logprobs.get("text_offset") or []]
    values: list[Any] = list(logprobs["token_logprobs"])
    ids: list[Any] = list(logprobs.get("token_ids") or [-1] * len(values))
    keep = [i for i, o in enumerate(offsets) if o >= prefix_len and o < full_len]
    if keep and keep[0] == 0 and len(offsets) > 1 and offsets[1] == offsets[0]:
        keep = keep[1:]  # a special token rendered as no text (BOS) sits at the same offset as the next
    ends = [*offsets[1:], full_len]
    nan = float("nan")
    return TokenScores(
        token_ids=tuple(int(ids[i]) for i in keep),
        logprobs=tuple(nan if values[i] is None else float(values[i]) for i in keep),
        offsets=tuple((offsets[i] - prefix_len, max(offsets[i], ends[i]) - prefix_len) for i in keep),
    )

