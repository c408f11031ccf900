"""Hooks: how compression, retrieval or any other layer rewrites chat traffic on its way through.

A hook sees every chat request before it reaches the model (`on_request`, may return a rewritten
request) and every whole, non-streamed answer after (`on_response`, may rewrite the choice texts).
Streamed answers reach the client as they are produced, so `on_response` is not called for them.
Hooks run in a worker thread (they may be slow: compression scores tokens with a model), in order.

The same hooks serve `terse serve` (engine and proxy mode) and `terse.pipelines.wrap.wrap_openai`.
Built-in hooks are named in `HOOKS` and built by `build_hook(name, options)`.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from terse.errors import ConfigError
from terse.pipelines.server.schema import ChatRequest


@dataclass(frozen=True)
class ChatResult:
    """The text of each choice of one whole chat answer, in choice order."""

    texts: tuple[str, ...]


@runtime_checkable
class ChatHook(Protocol):
    """Rewrites chat requests and answers. Must be thread-safe: requests run concurrently."""

    name: str
    """Short name for logs and headers."""

    def on_request(self, request: ChatRequest) -> ChatRequest:
        """Return the request to send (the same object when nothing changes)."""
        ...

    def on_response(self, request: ChatRequest, result: ChatResult) -> ChatResult:
        """Return the answer to give the client (`request` is the rewritten request that was sent)."""
        ...


TokenCount = Literal["tokenizer", "estimate"]

class PromptCounter(Protocol):
    """Tokens of the prompt some messages and tool definitions make.

    The messages are `ChatRequest.prompt_messages()`: the wire form (tool_calls, tool_call_id, name kept)
    with text contents, so what the upstream renders is counted. `tools` are the request's tool
    definitions (`ChatRequest.prompt_tools()`, `()` without): their JSON schemas go upstream and are
    billed as prompt tokens. A counter that knows the model's chat template renders them with it; one
    that does not counts `tools_message(tools)` as one more message, through its own tokenizer or
    estimate. A counter taking the messages alone still works anywhere one is accepted: `counting_tools`
    makes it count the tools that way."""

    def __call__(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> int: ...


MessagesCounter = Callable[[Sequence[Mapping[str, Any]]], int]
"""A prompt counter over the messages alone (the form counters had before they counted tools)."""


def tools_message(tools: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The tool definitions as the one system message a counter without the upstream's chat template
    counts for them: each definition's compact JSON on its own line (how chat templates commonly list
    tools; the template's own wording around them is not known, so not counted)."""
    return {"role": "system", "content": "\n".join(json.dumps(t, separators=(",", ":"), ensure_ascii=False) for t in tools)}


def counting_tools(count: PromptCounter | MessagesCounter) -> PromptCounter:
    """`count` as a `PromptCounter`: itself when it takes `tools`; a counter of messages alone counts
    the tools as `tools_message(tools)` after the messages."""
    if _takes_tools(count):
        return count  # type: ignore[return-value]
    messages_only: MessagesCounter = count  # type: ignore[assignment]

    def with_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> int:
        return messages_only([*messages, tools_message(tools)] if tools else messages)

    return with_tools


def _takes_tools(count: Callable[..., int]) -> bool:
    try:
        parameters = inspect.signature(count).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins): called with messages only
        return False
    return "tools" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@dataclass(frozen=True)
class PromptAccounting:
    """Prompt tokens before and after the hooks, counted with one counter so the difference is fair.

    The same facts leave as `x-terse-*` headers and as `usage.terse` (whole answers and the final usage
    chunk of streams): `headers()` and `usage_fields()` are two spellings of one record.
    """

    original_prompt_tokens: int
    """Tokens of the prompt as the client sent it."""
    sent_prompt_tokens: int
    """Tokens of the prompt the model was given."""
    token_count: TokenCount = "tokenizer"
    """How both were counted: with the model's tokenizer, or estimated (~4 characters per token)."""
    notes: Mapping[str, str | int] = field(default_factory=dict)
    """What the hooks reported (e.g. the compress hook's compressed and unrecognised messages)."""

    @property
    def saved_prompt_tokens(self) -> int:
        return self.original_prompt_tokens - self.sent_prompt_tokens

    def usage_fields(self) -> dict[str, Any]:
        """Added under `usage["terse"]` of non-streamed answers and of the final usage chunk."""
        return {
            "original_prompt_tokens": self.original_prompt_tokens,
            "sent_prompt_tokens": self.sent_prompt_tokens,
            "saved_prompt_tokens": self.saved_prompt_tokens,
            "token_count": self.token_count,
            **self.notes,
        }

    def headers(self) -> dict[str, str]:
        """`x-terse-<field>` for every usage field, `_` spelled `-`."""
        return {f"x-terse-{k.replace('_', '-')}": str(v) for k, v in self.usage_fields().items()}

    @classmethod
    def from_usage(cls, fields: Mapping[str, Any]) -> PromptAccounting:
        """The accounting back from a `usage.terse` mapping."""
        known = ("original_prompt_tokens", "sent_prompt_tokens", "saved_prompt_tokens", "token_count")
        notes = {k: v for k, v in fields.items() if k not in known}
        return cls(fields["original_prompt_tokens"], fields["sent_prompt_tokens"], fields.get("token_count", "tokenizer"), notes)


class HookChain:
    """Hooks applied in order on the way in and in reverse order on the way out."""

    def __init__(self, hooks: Sequence[ChatHook] = ()) -> None:
        self.hooks = tuple(hooks)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def on_request(self, request: ChatRequest) -> ChatRequest:
        if not request.text_only:
            return request  # non-text parts (images, audio) are never rewritten
        for hook in self.hooks:
            request = hook.on_request(request)
        return request

    def on_response(self, request: ChatRequest, result: ChatResult) -> ChatResult:
        if not request.text_only:
            return result
        for hook in reversed(self.hooks):
            result = hook.on_response(request, result)
        return result

    def account(
        self,
        original: ChatRequest,
        sent: ChatRequest,
        count: PromptCounter | MessagesCounter,
        estimated: bool = False,
        num_original: int | None = None,
    ) -> PromptAccounting:
        """Count both prompts as they go upstream (`ChatRequest.prompt_messages`, tool calls included,
        with the request's tool definitions, `ChatRequest.prompt_tools`) with `count` (`estimated`: it is
        not the model's tokenizer); counts once when the hooks changed nothing; `num_original`: the
        original's count, when already made (a counter of messages alone counts the tools as one more
        message, `counting_tools`). The hooks' notes (`sent.notes`) travel along."""
        count = counting_tools(count)
        before, after = original.prompt_messages(), sent.prompt_messages()
        tools_before, tools_after = original.prompt_tools(), sent.prompt_tools()
        if num_original is None:
            num_original = count(before, tools_before)
        num_sent = num_original if (before, tools_before) == (after, tools_after) else count(after, tools_after)
        return PromptAccounting(num_original, num_sent, "estimate" if estimated else "tokenizer", dict(sent.notes))


# name -> "module:factory"; a factory takes the options mapping and returns a ChatHook
HOOKS: dict[str, str] = {
    "compress": "terse.pipelines.server.layer_hooks:CompressHook.from_options",
    "retrieve": "terse.pipelines.server.layer_hooks:RetrieveHook.from_options",
}


def build_hook(name: str, options: Mapping[str, Any]) -> ChatHook:
    """Build a registered hook; `ConfigError` names the known hooks when `name` is not one."""
    target = HOOKS.get(name)
    if target is None:
        raise ConfigError(f"unknown hook {name!r}; known hooks: {sorted(HOOKS)}")
    module_name, _, attr_path = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    hook: ChatHook = obj(options)
    return hook
