"""Parsed, validated OpenAI requests: `ChatRequest` and `CompletionRequest`.

Parsing is hand-written (no pydantic models) so every rejection names the field (`param`), the value, the
limit and the fix, and so proxy mode can forward fields it does not know (tools, response_format, ...)
untouched: each request keeps the JSON `body` it came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from terse.backend.types import MAX_TOP_LOGPROBS, Message, SamplingParams
from terse.errors import InvalidRequestError
from terse.pipelines.server.config import ServerConfig
from terse.pipelines.server.errors import ApiError, invalid

_ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass(frozen=True)
class ChatRequest:
    """One /v1/chat/completions request. Hooks return a new one (`with_messages`); never mutate."""

    model: str
    """Model id the client asked for."""
    messages: tuple[Message, ...]
    """Text messages (content parts joined); "developer" is mapped to "system"."""
    params: SamplingParams
    """All sampling settings of the request, as one object."""
    max_tokens_given: bool
    """Whether the client set max_tokens / max_completion_tokens (else the server picks a default)."""
    n: int
    """Choices to generate."""
    stream: bool
    """Answer with SSE chunks."""
    include_usage: bool
    """`stream_options.include_usage`: send a final chunk with usage."""
    body: Mapping[str, Any]
    """The JSON body as received (proxy mode forwards it, with `messages` replaced if a hook changed them)."""
    text_only: bool = True
    """False when some message had non-text parts (images, audio): hooks are skipped, proxy forwards as is."""
    wire_messages: tuple[Mapping[str, Any], ...] = ()
    """The messages as they go upstream, one per entry of `messages`, with every field kept (tool_calls,
    tool_call_id, name, content parts, unknown keys); () for a request built by hand."""
    notes: Mapping[str, str | int] = dataclasses.field(default_factory=dict)
    """What hooks report about their rewrite; sent as `x-terse-<key>` headers and under `usage.terse`."""

    def with_messages(self, messages: tuple[Message, ...]) -> ChatRequest:
        """New text messages. One that is one of this request's own (the same object) keeps its wire
        form; when the roles line up with this request's, a rewritten message keeps its other wire fields
        (name, tool_call_id, ...) with the new content; any other message goes upstream as
        {"role", "content"}."""
        own = {id(m): w for m, w in zip(self.messages, self.wire_messages)}
        same_shape = len(messages) == len(self.wire_messages) and all(
            m["role"] == o["role"] for m, o in zip(messages, self.messages)
        )
        wire = tuple(
            own.get(id(m))
            or ({**self.wire_messages[i], "content": m["content"]} if same_shape else None)
            or dict(m)
            for i, m in enumerate(messages)
        )
        return dataclasses.replace(self, messages=messages, wire_messages=wire)

    def with_wire_messages(self, wire: tuple[Mapping[str, Any], ...]) -> ChatRequest:
        """New wire messages (every field kept as given); the text messages are derived from them."""
        return dataclasses.replace(self, messages=tuple(_message(m, i)[0] for i, m in enumerate(wire)), wire_messages=wire)

    def prompt_messages(self) -> tuple[Mapping[str, Any], ...]:
        """The messages as they go upstream, for counting: each one's wire fields (tool_calls,
        tool_call_id, name, ...) with its text as `content` (parts joined, null as ""). What a prompt
        counter renders: the text alone would miss the tool calls the upstream renders too."""
        if not self.wire_messages:
            return self.messages
        return tuple({**w, "role": m["role"], "content": m["content"]} for m, w in zip(self.messages, self.wire_messages))

    def prompt_tools(self) -> tuple[Mapping[str, Any], ...]:
        """The tool definitions the request carries (`tools`), for counting: their JSON schemas go
        upstream and are billed as prompt tokens. () without tools (or when `tools` is not a list;
        engine mode refuses that with a 400 of its own)."""
        tools = self.body.get("tools")
        if not isinstance(tools, list | tuple):
            return ()
        return tuple(t for t in tools if isinstance(t, Mapping))

    def with_notes(self, **notes: str | int) -> ChatRequest:
        return dataclasses.replace(self, notes={**self.notes, **notes})

    def upstream_body(self) -> dict[str, Any]:
        """The body to forward: the original one, with the messages a hook rewrote.

        Messages no hook changed leave exactly as sent (names, tool calls, content parts); a message
        whose text a hook rewrote keeps its other keys when the hook kept the message list's shape.
        """
        body = dict(self.body)
        if self.text_only:
            wire = self.wire_messages or self.messages
            body["messages"] = [dict(m) for m in wire]
        return body


@dataclass(frozen=True)
class CompletionRequest:
    """One /v1/completions request."""

    model: str
    """Model id the client asked for."""
    prompts: tuple[str | tuple[int, ...], ...]
    """Prompts (text or token ids); each gets `n` choices, indexed prompt-major."""
    params: SamplingParams
    """All sampling settings of the request, as one object."""
    max_tokens_given: bool
    """Whether the client set max_tokens (default 16, as OpenAI's)."""
    n: int
    """Choices per prompt."""
    stream: bool
    """Answer with SSE chunks."""
    include_usage: bool
    """`stream_options.include_usage`."""
    echo: bool
    """Return the prompt before the completion (with max_tokens=0 and logprobs: prompt log-probabilities)."""
    logprobs: int | None
    """Alternatives per token whose log-probabilities are returned (also in `params.logprobs`); with echo
    and max_tokens=0 the prompt's log-probabilities instead."""
    body: Mapping[str, Any]
    """The JSON body as received."""


def _field(body: Mapping[str, Any], name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is never a valid count or number here
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise invalid(f"'{name}' must be {what}, got {value!r}", name, "invalid_type")
    return value


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid(f"'model' must be a non-empty string (see GET /v1/models), got {model!r}", "model")
    return model


def _sampling(body: Mapping[str, Any], config: ServerConfig, default_max_tokens: int) -> tuple[SamplingParams, bool]:
    max_tokens = _field(body, "max_completion_tokens", (int,), "an integer")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = _field(body, "max_tokens", (int,), "an integer"), "max_tokens"
    given = max_tokens is not None
    if given and not 0 <= max_tokens <= config.max_tokens_limit:
        raise invalid(
            f"'{name}'={max_tokens} is outside 0..{config.max_tokens_limit} (this server's limit); ask for fewer",
            name,
        )
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise invalid(f"'stop' must be a non-empty string or a list of them, got {stop!r}", "stop", "invalid_type")
    if stop is not None and len(stop) > 16:
        raise invalid(f"'stop' has {len(stop)} strings; at most 16 are allowed", "stop")
    temperature = _field(body, "temperature", (int, float), "a number in [0, 2]", 1.0)
    if not 0 <= temperature <= 2:
        raise invalid(f"'temperature'={temperature} must be in [0, 2] (0 = greedy)", "temperature")
    seed = _field(body, "seed", (int,), "an integer")
    if seed is not None and not -(2**63) <= seed < 2**63:  # int64, as OpenAI's; torch seeds overflow past it
        raise invalid(f"'seed'={seed} is outside the 64-bit range -2**63..2**63-1; pick a smaller seed", "seed")
    top_p = _field(body, "top_p", (int, float), "a number in (0, 1]", 1.0)
    if not 0 < top_p <= 1:  # before float(): a huge integer would overflow it
        raise invalid(f"'top_p'={top_p} must be in (0, 1]; use 1 to disable it", "top_p")
    try:
        params = SamplingParams(
            max_tokens=max_tokens if given else default_max_tokens,
            temperature=float(temperature),
            top_p=float(top_p),
            stop=tuple(stop or ()),
            seed=seed,
            ignore_eos=bool(_field(body, "ignore_eos", (bool,), "a boolean", False)),
        )
    except InvalidRequestError as e:
        raise invalid(str(e), "top_p" if "top_p" in str(e) else None) from e
    return params, given


def _common(body: Mapping[str, Any], config: ServerConfig) -> tuple[int, bool, bool]:
    n = _field(body, "n", (int,), "an integer", 1)
    if not 1 <= n <= config.max_n:
        raise invalid(f"'n'={n} must be in 1..{config.max_n}", "n")
    stream = _field(body, "stream", (bool,), "a boolean", False)
    options = _field(body, "stream_options", (dict,), "an object", {})
    include_usage = _field(options, "include_usage", (bool,), "a boolean", False)
    return n, stream, include_usage


def _message(raw: Any, i: int) -> tuple[Message, bool]:
    """A text message from one raw message; the flag is False when it had non-text parts."""
    if not isinstance(raw, dict):
        raise invalid(f"messages[{i}] must be an object with 'role' and 'content', got {raw!r}", f"messages[{i}]")
    role = raw.get("role")
    if role not in _ROLES:
        raise invalid(f"messages[{i}].role={role!r} must be one of {sorted(_ROLES)}", f"messages[{i}].role")
    content = raw.get("content")
    text_only = True
    if content is None:
        content = ""  # assistant messages carrying only tool calls
    elif isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict)]
        if len(parts) != len(content):
            raise invalid(f"messages[{i}].content parts must be objects", f"messages[{i}].content")
        text_only = all(p.get("type") == "text" for p in parts)
        content = "".join(str(p.get("text", "")) for p in parts if p.get("type") == "text")
    elif not isinstance(content, str):
        raise invalid(
            f"messages[{i}].content must be a string or a list of content parts, got {type(content).__name__}",
            f"messages[{i}].content",
            "invalid_type",
        )
    mapped_role = "system" if role == "developer" else role
    return cast(Message, {"role": mapped_role, "content": content}), text_only


def parse_chat(body: Any, config: ServerConfig) -> ChatRequest:
    """Validate a chat request body; raise `ApiError` (400) naming the bad field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    model = _model(body)
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise invalid("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    if len(raw_messages) > config.max_messages:
        raise invalid(
            f"'messages' has {len(raw_messages)} entries, more than this server's limit of {config.max_messages}",
            "messages",
        )
    parsed = [_message(m, i) for i, m in enumerate(raw_messages)]
    params, given = _sampling(body, config, config.default_max_tokens)
    params = dataclasses.replace(params, logprobs=_chat_logprobs(body))
    n, stream, include_usage = _common(body, config)
    return ChatRequest(
        model=model,
        messages=tuple(m for m, _ in parsed),
        params=params,
        max_tokens_given=given,
        n=n,
        stream=stream,
        include_usage=include_usage,
        body=body,
        text_only=all(ok for _, ok in parsed),
        wire_messages=tuple(raw_messages),
    )


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """`logprobs: true` (+ `top_logprobs: k`) -> alternatives per token for SamplingParams; None when off."""
    wanted = _field(body, "logprobs", (bool,), "a boolean", False)
    top = _field(body, "top_logprobs", (int,), f"an integer in 0..{MAX_TOP_LOGPROBS}")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise invalid(f"'top_logprobs'={top} must be in 0..{MAX_TOP_LOGPROBS}", "top_logprobs")
    if top is not None and not wanted:
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _prompts(raw: Any) -> tuple[str | tuple[int, ...], ...]:
    is_ids = lambda p: isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    if isinstance(raw, str) and raw:
        return (raw,)
    if is_ids(raw):
        return (tuple(raw),)
    if isinstance(raw, list) and raw and all((isinstance(p, str) and p) or is_ids(p) for p in raw):
        return tuple(p if isinstance(p, str) else tuple(p) for p in raw)
    raise invalid(
        "'prompt' must be a non-empty string, a list of strings, a list of token ids, or a list of such lists",
        "prompt",
        "invalid_type",
    )


def parse_completion(body: Any, config: ServerConfig) -> CompletionRequest:
    """Validate a completions request body; raise `ApiError` (400) naming the bad field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    model = _model(body)
    prompts = _prompts(body.get("prompt"))
    params, given = _sampling(body, config, 16)  # 16: OpenAI's documented default for completions
    n, stream, include_usage = _common(body, config)
    logprobs = _field(body, "logprobs", (int,), f"an integer in 0..{MAX_TOP_LOGPROBS}")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise invalid(f"'logprobs'={logprobs} must be in 0..{MAX_TOP_LOGPROBS}", "logprobs")
    params = dataclasses.replace(params, logprobs=logprobs)
    return CompletionRequest(
        model=model,
        prompts=prompts,
        params=params,
        max_tokens_given=given,
        n=n,
        stream=stream,
        include_usage=include_usage,
        echo=bool(_field(body, "echo", (bool,), "a boolean", False)),
        logprobs=logprobs,
        body=body,
    )


__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "parse_chat", "parse_completion"]
