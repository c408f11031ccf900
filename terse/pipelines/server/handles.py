"""Request handles of one HTTP request: context-length fitting, per-choice seeds, merged streaming, usage."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from terse.backend.handle import RequestHandle
from terse.backend.types import Completion, SamplingParams, Usage
from terse.pipelines.server.errors import invalid


def fit_params(params: SamplingParams, given: bool, num_prompt: int, max_model_len: int) -> SamplingParams:
    """Check prompt + max_tokens against the context; an absent max_tokens shrinks to what is left."""
    room = max_model_len - num_prompt
    if room <= 0:
        raise invalid(
            f"the prompt is {num_prompt} tokens but the model's context holds {max_model_len}; "
            f"shorten the prompt (or enable compression)",
            "messages",
            "context_length_exceeded",
        )
    if given and params.max_tokens > room:
        raise invalid(
            f"max_tokens={params.max_tokens} plus the prompt's {num_prompt} tokens exceeds the model's context "
            f"length {max_model_len}; ask for at most {room}",
            "max_tokens",
            "context_length_exceeded",
        )
    return params if given else dataclasses.replace(params, max_tokens=min(params.max_tokens, room))


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: seed + index, so choices differ but a seeded request repeats exactly."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


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
