"""Request handles of one HTTP request: context-length fitting, per-choice seeds, merged streaming, usage."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from terse.backend.base import Backend
from terse.backend.handle import RequestHandle
from terse.backend.types import Completion, SamplingParams, Usage
from terse.pipelines.server.errors import invalid


@runtime_checkable
class GenerationRoom(Protocol):
    """A backend that knows how many tokens a prompt may generate beyond the context (the local
    engine: what its KV pool holds)."""

    def max_new_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """`num_prompt_tokens`: the prompt as submitted (`submitted_prompt_len`)."""
        ...


@runtime_checkable
class AddedPromptTokens(Protocol):
    """A backend that adds special tokens (BOS) to a text prompt on submit (the local engine, HF)."""

    def num_added_tokens(self, prompt: str) -> int:
        """Tokens `submit(prompt)` adds to the `count_tokens(prompt)` tokens of the text (0 when the prompt
        already starts with them)."""
        ...


def submitted_prompt_len(backend: Backend, prompt: str | Sequence[int], num_text_tokens: int | None = None) -> int:
    """Tokens `prompt` holds once `backend` has it: ids as given; a text's `count_tokens` (or
    `num_text_tokens`, when already counted) plus the special tokens the backend adds on submit
    (`AddedPromptTokens`; a backend that does not say adds none)."""
    if not isinstance(prompt, str):
        return len(prompt)
    num_tokens = backend.count_tokens(prompt) if num_text_tokens is None else num_text_tokens
    if isinstance(backend, AddedPromptTokens):
        num_tokens += backend.num_added_tokens(prompt)
    return num_tokens


def fit_params(
    params: SamplingParams, given: bool, num_prompt: int, backend: Backend, *, prompt_param: str = "messages"
) -> SamplingParams:
    """Check prompt + max_tokens against the context; an absent max_tokens shrinks to what is left.

    `num_prompt` counts the prompt as the backend holds it, special tokens included
    (`submitted_prompt_len`), so a request this check passes is not refused by the backend for length.
    What is left is the context (max_model_len - prompt) and, for a `GenerationRoom` backend, what
    its KV pool can hold for this prompt, so a default never asks for more than can run. A prompt
    with no room is rejected naming `prompt_param` ("messages" for chat, "prompt" for completions).
    """
    max_model_len = backend.max_model_len
    room = max_model_len - num_prompt
    if room <= 0:
        raise invalid(
            f"the prompt is {num_prompt} tokens but the model's context holds {max_model_len}; "
            f"shorten the prompt (or enable compression)",
            prompt_param,
            "context_length_exceeded",
        )
    if given:
        if params.max_tokens > room:
            raise invalid(
                f"max_tokens={params.max_tokens} plus the prompt's {num_prompt} tokens exceeds the model's "
                f"context length {max_model_len}; ask for at most {room}",
                "max_tokens",
                "context_length_exceeded",
            )
        return params
    if isinstance(backend, GenerationRoom):
        room = min(room, backend.max_new_tokens(num_prompt, params))
        if room <= 0:
            raise invalid(
                f"the prompt is {num_prompt} tokens, more than this server's KV cache holds for one request; "
                f"shorten the prompt (or enable compression)",
                prompt_param,
                "context_length_exceeded",
            )
    return dataclasses.replace(params, max_tokens=min(params.max_tokens, room))


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: seed + index, so choices differ but a seeded request repeats exactly.

    The sum wraps within the int64 range the server accepts seeds in (2**63 - 1 + 1 is -2**63).
    """
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + index + 2**63) % 2**64 - 2**63)


def total_usage(completions: Sequence[Completion]) -> Usage:
    """The prompt is counted once (as OpenAI does for n > 1); completion tokens add up."""
    first = completions[0].usage
    return Usage(first.prompt_tokens, first.cached_prompt_tokens, sum(c.usage.completion_tokens for c in completions))


async def wait_handle(handle: RequestHandle) -> Completion:
    """Await a handle's completion such that cancelling the waiting task leaves the request alone.

    (`await handle` wraps the handle's future; cancelling that wrapper would cancel the future itself,
    so the backend would never hear of it. Cancellation goes through `handle.cancel()` only.)
    """
    async for _ in handle.astream():
        pass
    return handle.result()


async def merge_streams(handles: Sequence[RequestHandle]) -> AsyncIterator[tuple[int, str | Completion]]:
    """Yield (choice index, text delta) as deltas arrive, then (index, Completion) when each ends."""
    queue: asyncio.Queue[tuple[int, str | Completion | BaseException]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for delta in handle.astream():
                queue.put_nowait((i, delta))
            queue.put_nowait((i, handle.result()))  # done: astream only ends once the request has
        except Exception as e:  # handed to the consumer, which reports it in the stream
            queue.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            remaining -= isinstance(item, Completion)
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


def cancel_all(handles: Sequence[RequestHandle]) -> None:
    for h in handles:
        h.cancel()  # no-op for finished handles
