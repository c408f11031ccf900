"""Which request parameters engine mode honours, and the 400 naming each one it cannot.

Every top-level field of a /v1/chat/completions or /v1/completions body is in exactly one class:

- honoured: parsed by `schema.py` and acted on (`HONOURED`);
- structured output (`response_format`, `tools`, `tool_choice`, `parallel_tool_calls`,
  `structured_outputs`): parsed and checked by the structured-output layer, never refused here;
- inert at its default: accepted when absent, null or at the value that changes nothing (a penalty of
  0, `store: false`, `modalities: ["text"]`, ...); any other value is refused with what to send instead
  (`INERT`);
- anything else: refused as an unrecognized argument, as OpenAI refuses it.

Both endpoints answer from these tables, so they never disagree on a shared field. Messages are checked
too: keys terse cannot render (`name`, `audio`, ...) and non-text content parts are refused in engine
mode (a text-only model would otherwise answer without seeing them). Proxy mode checks none of this:
it forwards every field unchanged and lets the upstream decide.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from terse.pipelines.server.errors import ApiError, invalid
from terse.pipelines.server.structured import STRUCTURED_FIELDS

Endpoint = Literal["chat", "completions"]

_COMMON = {
    "model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options",
    "logprobs", "ignore_eos", "user", "safety_identifier", "metadata", "prompt_cache_key",
}
HONOURED: dict[Endpoint, frozenset[str]] = {
    "chat": frozenset(_COMMON | {"messages", "max_completion_tokens", "top_logprobs"}),
    "completions": frozenset(_COMMON | {"prompt", "echo"}),
}
"""Parsed by schema.py and acted on; `user`, `safety_identifier`, `metadata` and `prompt_cache_key` are
annotations (terse's prefix cache needs no key) checked for shape only."""

STRUCTURED = frozenset(STRUCTURED_FIELDS)
"""Fields owned by the structured-output layer (grammar-constrained decoding, tool calls; structured.py),
which checks them for both endpoints (tools on /v1/completions get its 400)."""

_Check = Callable[[Any, Mapping[str, Any]], bool]


def _absent_or(*values: Any) -> _Check:
    return lambda v, _body: v is None or any(v == x and type(v) is type(x) for x in values)


def _no_penalty(v: Any, _body: Mapping[str, Any]) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v == 0)


def _best_of(v: Any, body: Mapping[str, Any]) -> bool:
    n = body.get("n") or 1
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v == n)


INERT: dict[str, tuple[_Check, str]] = {
    "frequency_penalty": (_no_penalty, "terse samples without repetition penalties; send 0 or leave it out"),
    "presence_penalty": (_no_penalty, "terse samples without repetition penalties; send 0 or leave it out"),
    "logit_bias": (lambda v, _: v is None or v == {}, "terse does not bias logits; leave it out"),
    "store": (_absent_or(False), "terse does not store completions; send false or leave it out"),
    "modalities": (lambda v, _: v is None or v == ["text"], 'terse answers in text only; send ["text"]'),
    "audio": (_absent_or(), "terse answers in text only; leave 'audio' out"),
    "prediction": (_absent_or(), "predicted outputs are not supported; leave 'prediction' out"),
    "reasoning_effort": (_absent_or(), "the served model has no reasoning-effort setting; leave it out"),
    "verbosity": (_absent_or(), "the served model has no verbosity setting; leave it out"),
    "web_search_options": (_absent_or(), "terse does not search the web; leave 'web_search_options' out"),
    "service_tier": (_absent_or("auto", "default"), "terse has one service tier; send 'auto' or leave it out"),
    "functions": (lambda v, _: v is None or v == [], "'functions' is deprecated; send 'tools' instead"),
    "function_call": (_absent_or(), "'function_call' is deprecated; send 'tool_choice' instead"),
    "suffix": (_absent_or(""), "terse does not fill in the middle; leave 'suffix' out"),
    "best_of": (_best_of, "terse does not rank extra candidates; leave 'best_of' out (or send n)"),
}
"""field -> (accepts the value?, the fix). Accepted values change nothing, so accepting them is honest."""

_INERT_BY_ENDPOINT: dict[Endpoint, frozenset[str]] = {
    "chat": frozenset(INERT) - {"suffix", "best_of"},
    "completions": frozenset({"frequency_penalty", "presence_penalty", "logit_bias", "suffix", "best_of"}),
}
_STREAM_OPTIONS = frozenset({"include_usage"})
_MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "tool_call_id"})
"""Message keys engine mode renders (tool keys: the structured-output layer's)."""
_NULL_MESSAGE_KEYS = frozenset({"name", "refusal", "audio", "function_call"})
"""Message keys accepted only when null: the chat template has no place for them."""


def check_supported(body: Mapping[str, Any], endpoint: Endpoint) -> None:
    """Raise a 400 naming the first parameter of `body` engine mode cannot honour (see module docstring)."""
    honoured = HONOURED[endpoint]
    inert = _INERT_BY_ENDPOINT[endpoint]
    for name, value in body.items():
        if name in honoured or name in STRUCTURED:
            continue
        if name in inert:
            accepts, fix = INERT[name]
            if not accepts(value, body):
                raise invalid(f"'{name}'={_short(value)} is not supported: {fix}", name, "unsupported_parameter")
            continue
        raise _unrecognized(name, endpoint)
    _check_annotations(body)
    options = body.get("stream_options")
    if isinstance(options, dict):
        for key in options:
            if key not in _STREAM_OPTIONS:
                raise invalid(
                    f"'stream_options.{key}' is not supported; terse knows only 'include_usage'",
                    f"stream_options.{key}",
                    "unsupported_parameter",
                )
    if endpoint == "chat" and isinstance(body.get("messages"), list):
        for i, message in enumerate(body["messages"]):
            if isinstance(message, dict):
                _check_message(message, i)


def _unrecognized(name: str, endpoint: Endpoint) -> ApiError:
    known = sorted(HONOURED[endpoint] | _INERT_BY_ENDPOINT[endpoint] | STRUCTURED)
    return invalid(
        f"unrecognized request argument '{name}'; /v1/{'chat/' if endpoint == 'chat' else ''}completions "
        f"accepts {known}",
        name,
        "unknown_parameter",
    )


def _check_annotations(body: Mapping[str, Any]) -> None:
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise invalid(f"'{name}' must be a string, got {_short(value)}", name, "invalid_type")
    metadata = body.get("metadata")
    if metadata is None:
        return
    if not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    )):
        raise invalid("'metadata' must be an object of at most 16 string keys and string values", "metadata")


def _check_message(message: Mapping[str, Any], i: int) -> None:
    for key, value in message.items():
        if key in _MESSAGE_KEYS or (key in _NULL_MESSAGE_KEYS and value is None):
            continue
        param = f"messages[{i}].{key}"
        if key in _NULL_MESSAGE_KEYS:
            raise invalid(
                f"'{param}' is not supported: the model's chat template has no place for it; "
                f"put it in the content instead",
                param,
                "unsupported_parameter",
            )
        raise invalid(f"unrecognized message field '{param}'", param, "unknown_parameter")
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise invalid(
                    f"messages[{i}].content[{j}] is a {kind!r} part; the served model reads text only: send "
                    f"text parts (or put terse in proxy mode in front of a multimodal model)",
                    f"messages[{i}].content[{j}]",
                    "unsupported_content",
                )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
