"""`wrap_openai(client, *hooks)`: run terse's chat hooks inside an application that uses the `openai` client.

    client = wrap_openai(openai.OpenAI(), CompressHook(...))
    client.chat.completions.create(model=..., messages=...)   # messages pass through the hooks first

The wrapper is a thin proxy: `chat.completions.create` (sync or async client) runs every hook's
`on_request` on the messages, calls the real client, and runs `on_response` on whole (non-streamed)
answers; everything else is the wrapped client's own attribute. Whole answers, and the usage chunk of
streams, also get `usage.terse = {"original_prompt_tokens", "sent_prompt_tokens", "saved_prompt_tokens",
"token_count", ...hook notes}`, counted with `count_prompt_tokens` over the messages as sent, tool calls
included (`ChatRequest.prompt_messages`), and the call's `tools` (their schemas are billed as prompt
tokens too; a counter of messages alone counts them as one more message, `hooks.counting_tools`).
Default: ~4 characters per token plus 4 per message, as proxy mode estimates; `token_count` then says
"estimate".
Messages go to the client in their wire form: a hook's rewrite keeps tool_calls, tool_call_id, name and
other fields of every message.
Requests whose messages have non-text parts (images, audio) pass through untouched, as in the server.
The `openai` package itself is not imported here: any object of the same shape works.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from terse.errors import InvalidRequestError
from terse.pipelines.server.config import ServerConfig
from terse.pipelines.server.errors import ApiError
from terse.pipelines.server.hooks import (
    ChatHook,
    ChatResult,
    HookChain,
    MessagesCounter,
    PromptAccounting,
    PromptCounter,
    counting_tools,
    tools_message,
)
from terse.pipelines.server.schema import ChatRequest, parse_chat
from terse.pipelines.server.structured import calls_written_out

# the wrapper checks the request's shape, not a server's size limits
_NO_LIMITS = ServerConfig(max_messages=1_000_000, max_tokens_limit=10_000_000, max_n=1_000_000)


def estimate_prompt_tokens(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> int:
    """~4 characters per token plus 4 tokens of template overhead per message, earlier tool calls
    written into the content (`structured.calls_written_out`); tool definitions count as one more
    message of their JSON (`hooks.tools_message`)."""
    plain: list[Mapping[str, Any]] = list(calls_written_out(messages))
    if tools:
        plain.append(tools_message(tools))
    return sum(math.ceil(len(m["content"]) / 4) + 4 for m in plain)


class _Prepared:
    """One call's request before/after hooks, and how to finish its answer."""

    def __init__(self, chain: HookChain, count: PromptCounter, estimated: bool, kwargs: dict[str, Any]) -> None:
        self.chain = chain
        self.kwargs = kwargs
        body = {"model": kwargs.get("model"), "messages": kwargs.get("messages")}
        if kwargs.get("tools") is not None:
            body["tools"] = kwargs["tools"]  # counted: their schemas are billed as prompt tokens
        try:
            self.original: ChatRequest = parse_chat(_plain(body), _NO_LIMITS)
        except ApiError as e:
            raise InvalidRequestError(f"chat.completions.create: {e.message}") from e
        self.sent = chain.on_request(self.original)
        self.accounting = chain.account(self.original, self.sent, count, estimated=estimated)
        if self.sent.wire_messages != self.original.wire_messages:
            # the rewritten messages in wire form: tool_calls, tool_call_id, name and parts kept
            self.kwargs = {**kwargs, "messages": [dict(m) for m in self.sent.wire_messages]}

    def finish(self, response: Any) -> Any:
        if self.kwargs.get("stream"):
            # streamed text reached the caller as produced; hooks see whole answers only, but the usage
            # chunk (stream_options.include_usage) carries the accounting as whole answers do
            return _AccountedStream(response, self.accounting.usage_fields())
        choices = getattr(response, "choices", None) or []
        texts = ChatResult(tuple(str(getattr(c.message, "content", "") or "") for c in choices))
        texts = self.chain.on_response(self.sent, texts)
        for choice, text in zip(choices, texts.texts):
            choice.message.content = text
        _attach(response, self.accounting.usage_fields())
        return response


def _attach(response: Any, fields: dict[str, Any]) -> None:
    """`usage.terse = fields` on a response or chunk that has usage."""
    usage = getattr(response, "usage", None)
    if usage is not None:
        # a usage type that refuses extra fields keeps its own: the answer itself is unaffected
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            usage.terse = fields


class _AccountedStream:
    """A sync or async stream of chunks whose usage chunk gets `usage.terse`; everything else is the
    wrapped stream's own (close, response, context manager)."""

    def __init__(self, stream: Any, fields: dict[str, Any]) -> None:
        self._stream = stream
        self._fields = fields

    def __iter__(self) -> Iterator[Any]:
        for chunk in self._stream:
            _attach(chunk, self._fields)
            yield chunk

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for chunk in self._stream:
            _attach(chunk, self._fields)
            yield chunk

    def __enter__(self) -> _AccountedStream:
        self._stream.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.__exit__(*exc)

    async def __aenter__(self) -> _AccountedStream:
        await self._stream.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stream.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _plain(body: dict[str, Any]) -> dict[str, Any]:
    """Messages and tools may be pydantic objects or TypedDicts; the parser wants JSON-like dicts."""
    for key in ("messages", "tools"):
        items = body.get(key)
        if isinstance(items, list | tuple):
            body[key] = [_dict(item) for item in items]
    return body


def _dict(item: Any) -> Any:
    if isinstance(item, dict):
        return item
    dump = getattr(item, "model_dump", None)  # a pydantic model (nested objects become dicts too)
    if callable(dump):
        return dump(exclude_unset=True)
    return dict(item)


class _Completions:
    def __init__(self, inner: Any, chain: HookChain, count: PromptCounter | MessagesCounter) -> None:
        self._inner = inner
        self._chain = chain
        self._estimated = count is estimate_prompt_tokens
        self._count = counting_tools(count)
        # the async client's create is a plain function (a decorator) around a coroutine function
        is_async = inspect.iscoroutinefunction(inspect.unwrap(inner.create))
        self.create = self._acreate if is_async else self._create

    def _create(self, **kwargs: Any) -> Any:
        prepared = _Prepared(self._chain, self._count, self._estimated, kwargs)
        return prepared.finish(self._inner.create(**prepared.kwargs))

    async def _acreate(self, **kwargs: Any) -> Any:
        # hooks may be slow (compression runs a model): keep them off the event loop
        prepared = await asyncio.to_thread(_Prepared, self._chain, self._count, self._estimated, kwargs)
        response = await self._inner.create(**prepared.kwargs)
        return await asyncio.to_thread(prepared.finish, response)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Chat:
    def __init__(self, inner: Any, completions: _Completions) -> None:
        self._inner = inner
        self.completions = completions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class WrappedOpenAI:
    """An `openai.OpenAI` / `openai.AsyncOpenAI` whose chat completions pass through hooks."""

    def __init__(
        self,
        client: Any,
        hooks: Sequence[ChatHook],
        count_prompt_tokens: PromptCounter | MessagesCounter = estimate_prompt_tokens,
    ) -> None:
        self.wrapped = client
        self.hooks = HookChain(hooks)
        self.chat = _Chat(client.chat, _Completions(client.chat.completions, self.hooks, count_prompt_tokens))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def wrap_openai(
    client: Any,
    *hooks: ChatHook,
    count_prompt_tokens: PromptCounter | MessagesCounter = estimate_prompt_tokens,
) -> WrappedOpenAI:
    """Wrap `client` so its `chat.completions.create` calls pass through `hooks` (see module docstring).

    `count_prompt_tokens(messages, tools=())` counts a call's prompt (`hooks.PromptCounter`); one that
    takes the messages alone is accepted too, the tools then counted as one more message of their JSON.

    The client is not modified; use the returned object in its place.
    """
    return WrappedOpenAI(client, hooks, count_prompt_tokens)


def last_accounting(response: Any) -> PromptAccounting | None:
    """The prompt accounting a wrapped call attached to its answer's usage, if any."""
    fields = getattr(getattr(response, "usage", None), "terse", None)
    if not isinstance(fields, dict):
        return None
    return PromptAccounting.from_usage(fields)
