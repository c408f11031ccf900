"""Engine mode's /v1/completions: text or token-id prompts, `n` choices each, streaming, generated tokens'
log-probabilities (`logprobs=k`), and prompt log-probabilities (`echo=true, logprobs=0, max_tokens=0`,
which `OpenAIBackend.score()` relies on).

Choices are numbered prompt-major: choice `p * n + j` is the j-th sample of prompt p.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from terse.backend.handle import RequestHandle
from terse.backend.types import Completion, TokenLogprob, TokenScores, Usage
from terse.pipelines.server.errors import api_error_from, invalid
from terse.pipelines.server.handles import (
    cancel_all,
    fit_params,
    merge_streams,
    submitted_prompt_len,
    total_usage,
    wait_handle,
)
from terse.pipelines.server.logprobs import TokenTexts, completion_logprobs
from terse.pipelines.server.schema import CompletionRequest
from terse.pipelines.server.service import RequestContext, race_disconnect
from terse.pipelines.server.sse import (
    DONE_EVENT,
    SSEResponse,
    error_event,
    openai_finish_reason,
    sse_event,
    text_chunk,
    usage_body,
    usage_chunk,
)

if TYPE_CHECKING:
    from terse.pipelines.server.engine import EngineService


def _prompt_len(service: EngineService, prompt: str | tuple[int, ...]) -> int:
    return submitted_prompt_len(service.backend, prompt)


async def complete_prompts(service: EngineService, request: CompletionRequest, ctx: RequestContext) -> Response:
    scoring = request.echo and request.params.max_tokens == 0
    if request.logprobs is not None and request.echo and not scoring:
        raise invalid(
            "'logprobs' with 'echo' is supported for the prompt alone (max_tokens=0, logprobs=0) or for the "
            "generated tokens alone (echo=false); send one of those",
            "logprobs",
        )
    if scoring and request.logprobs:
        raise invalid(
            f"'logprobs'={request.logprobs}: prompt log-probabilities come without alternatives; send logprobs=0",
            "logprobs",
        )
    if scoring and request.logprobs is not None:
        return await _score_prompts(service, request, ctx)
    handles: list[RequestHandle] = []
    try:
        for prompt in request.prompts:
            num_prompt = await run_in_threadpool(_prompt_len, service, prompt)
            params = fit_params(request.params, request.max_tokens_given, num_prompt, service.backend, prompt_param="prompt")
            handles += service._submit(prompt, params, request.n)
    except Exception:
        cancel_all(handles)
        raise
    response_id, created = f"cmpl-{ctx.request_id}", int(time.time())
    echoes = [await _echo_text(service, request, p) for p in request.prompts]
    if request.stream:
        chunks = _stream(service, handles, request, ctx, response_id, created, echoes)
        return SSEResponse(chunks, ctx.response_headers(), on_close=lambda: _cancel_soon(handles))
    try:
        completions: list[Completion] = await race_disconnect(asyncio.gather(*(wait_handle(h) for h in handles)), ctx.http)
    finally:
        cancel_all(handles)
    texts = TokenTexts(service.backend.decode)
    choices = [
        {
            "index": k,
            "text": echoes[k // request.n] + c.text,
            "logprobs": None if c.logprobs is None else await run_in_threadpool(
                completion_logprobs, c.logprobs, texts, request.logprobs or 0
            ),
            "finish_reason": openai_finish_reason(c.finish_reason),
        }
        for k, c in enumerate(completions)
    ]
    usage = sum((total_usage(completions[p * request.n : (p + 1) * request.n]) for p in range(len(request.prompts))),
                Usage(0, 0, 0))
    body = {"id": response_id, "object": "text_completion", "created": created, "model": request.model,
            "choices": choices, "usage": usage_body(usage)}
    return JSONResponse(body, headers=ctx.response_headers())


async def _echo_text(service: EngineService, request: CompletionRequest, prompt: str | tuple[int, ...]) -> str:
    if not request.echo:
        return ""
    return prompt if isinstance(prompt, str) else await run_in_threadpool(service.backend.decode, list(prompt))


async def _stream(
    service: EngineService,
    handles: list[RequestHandle],
    request: CompletionRequest,
    ctx: RequestContext,
    response_id: str,
    created: int,
    echoes: Sequence[str],
) -> AsyncIterator[bytes]:
    done: list[Completion] = []
    texts = TokenTexts(service.backend.decode)
    offsets = [0] * len(handles)  # characters of each choice's text sent so far, and its logprob entries
    seen = [0] * len(handles)

    def new_logprobs(k: int, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if request.logprobs is None:
            return None
        body = completion_logprobs(entries, texts, request.logprobs, offsets[k])
        seen[k] += len(entries)
        offsets[k] += sum(len(t) for t in body["tokens"])
        return body

    try:
        for k in range(len(handles)):
            if echoes[k // request.n]:
                yield sse_event(text_chunk(response_id, created, request.model, k, echoes[k // request.n], None))
        async for k, item in merge_streams(handles):
            if isinstance(item, Completion):
                done.append(item)
                reason = openai_finish_reason(item.finish_reason)
                rest = new_logprobs(k, (item.logprobs or ())[seen[k] :])
                yield sse_event(text_chunk(response_id, created, request.model, k, "", reason, rest))
            else:
                entries = new_logprobs(k, handles[k].logprobs_since(seen[k]))
                yield sse_event(text_chunk(response_id, created, request.model, k, item, None, entries))
        if request.include_usage:
            usage = usage_body(Usage(
                sum(c.usage.prompt_tokens for c in done[:: request.n]),
                sum(c.usage.cached_prompt_tokens for c in done[:: request.n]),
                sum(c.usage.completion_tokens for c in done),
            ))
            yield sse_event(usage_chunk(response_id, created, request.model, "text_completion", usage))
    except Exception as e:  # the status line is gone: report in-band, then end the stream properly
        yield error_event(api_error_from(e).body())
    finally:
        cancel_all(handles)
    yield DONE_EVENT


async def _cancel_soon(handles: list[RequestHandle]) -> None:
    cancel_all(handles)


def _logprobs_body(text: str, scores: TokenScores) -> dict[str, Any]:
    return {
        "tokens": [text[a:b] for a, b in scores.offsets],
        "token_logprobs": [None if math.isnan(lp) else lp for lp in scores.logprobs],
        "text_offset": [a for a, _ in scores.offsets],
        "top_logprobs": None,
        "token_ids": list(scores.token_ids),  # not in OpenAI's schema; OpenAIBackend.score() reads it
    }


async def _score_prompts(service: EngineService, request: CompletionRequest, ctx: RequestContext) -> Response:
    texts = [
        p if isinstance(p, str) else await run_in_threadpool(service.backend.decode, list(p)) for p in request.prompts
    ]
    scores = await run_in_threadpool(service.backend.score, texts)
    choices = [
        {"index": i, "text": text, "logprobs": _logprobs_body(text, s), "finish_reason": "length"}
        for i, (text, s) in enumerate(zip(texts, scores))
    ]
    num_prompt = sum(len(s.token_ids) for s in scores)
    body = {
        "id": f"cmpl-{ctx.request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": usage_body(Usage(num_prompt, 0, 0)),
    }
    return JSONResponse(body, headers=ctx.response_headers())
