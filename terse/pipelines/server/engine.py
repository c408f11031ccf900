"""Engine mode: answer OpenAI requests from any terse Backend (typically `local:<path>`).

One request with `n` choices submits `n` handles (choice i gets seed + i when a seed is given, so the
choices differ yet stay reproducible). A client that disconnects cancels its handles: the engine frees
the request's KV blocks, the HF backend stops decoding its row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from terse.backend.base import Backend
from terse.backend.handle import RequestHandle
from terse.backend.types import Completion, Message, SamplingParams
from terse.errors import UnsupportedOperationError
from terse.pipelines.server.completions import complete_prompts
from terse.pipelines.server.config import ServerConfig
from terse.pipelines.server.errors import ApiError, api_error_from, invalid
from terse.pipelines.server.handles import (
    cancel_all,
    choice_params,
    fit_params,
    merge_streams,
    total_usage,
    wait_handle,
)
from terse.pipelines.server.hooks import ChatResult, HookChain
from terse.pipelines.server.schema import ChatRequest, CompletionRequest
from terse.pipelines.server.service import RequestContext, race_disconnect
from terse.pipelines.server.sse import (
    DONE_EVENT,
    SSEResponse,
    chat_chunk,
    error_event,
    openai_finish_reason,
    sse_event,
    usage_body,
    usage_chunk,
)
from terse.pipelines.server.structured import (
    StructuredRequest,
    constrained,
    parse_structured,
    prompt_messages,
)
from terse.pipelines.server.tool_calls import ChatDeltas, chat_message, finish_reason

logger = logging.getLogger("terse.server")


async def _cancel_soon(handles: list[RequestHandle]) -> None:
    cancel_all(handles)


class EngineService:
    """Serves chat and completions from one Backend. See the module docstring."""

    cheap_counting = False  # counting renders the chat template and tokenizes

    def __init__(self, backend: Backend, config: ServerConfig, hooks: HookChain) -> None:
        self.backend = backend
        self.config = config
        self.hooks = hooks
        self.model_ids = config.served_model_names or (backend.model_name,)
        self._created = int(time.time())

    # -- helpers ---------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {list(self.model_ids)} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def count_prompt_tokens(self, messages: Sequence[Message]) -> int:
        return self.backend.count_tokens(self.backend.render_chat(messages))

    def _submit(self, prompt: str | Sequence[int], params: SamplingParams, n: int) -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for i in range(n):
                handles.append(self.backend.submit(prompt, choice_params(params, i)))
        except Exception:
            cancel_all(handles)
            raise
        return handles

    # -- chat ------------------------------------------------------------------------------------
    async def chat(self, request: ChatRequest, ctx: RequestContext) -> Response:
        self.check_model(request.model)
        structured = parse_structured(request.body)  # response_format / tools (structured.py)
        messages = prompt_messages(request.messages, request.body.get("messages"), structured)
        prompt = await run_in_threadpool(self.backend.render_chat, messages)
        num_prompt = (
            ctx.accounting.sent_prompt_tokens
            if ctx.accounting is not None
            else await run_in_threadpool(self.backend.count_tokens, prompt)
        )
        params = fit_params(request.params, request.max_tokens_given, num_prompt, self.backend)
        handles = self._submit(prompt, constrained(params, structured), request.n)
        response_id, created = f"chatcmpl-{ctx.request_id}", int(time.time())
        if request.stream:
            chunks = self._chat_chunks(handles, request, ctx, response_id, created, structured)
            return SSEResponse(chunks, ctx.response_headers(), on_close=lambda: _cancel_soon(handles))
        try:
            completions: list[Completion] = await race_disconnect(asyncio.gather(*(wait_handle(h) for h in handles)), ctx.http)
        finally:
            cancel_all(handles)
        texts = ChatResult(tuple(c.text for c in completions))
        if self.hooks:
            texts = await run_in_threadpool(self.hooks.on_response, request, texts)
        messages_out = [chat_message(text, structured) for text in texts.texts]  # tool calls parsed
        choices = [
            {
                "index": i,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason(openai_finish_reason(c.finish_reason), has_calls),
            }
            for i, ((message, has_calls), c) in enumerate(zip(messages_out, completions))
        ]
        body = {
            "id": response_id,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": choices,
            "usage": usage_body(total_usage(completions), ctx.terse_usage()),
        }
        return JSONResponse(body, headers=ctx.response_headers())

    async def _chat_chunks(
        self,
        handles: list[RequestHandle],
        request: ChatRequest,
        ctx: RequestContext,
        response_id: str,
        created: int,
        structured: StructuredRequest | None = None,
    ) -> AsyncIterator[bytes]:
        model = request.model
        done: list[Completion] = []
        deltas = [ChatDeltas(structured) for _ in handles]  # text -> content / tool_calls deltas
        try:
            for i in range(len(handles)):
                yield sse_event(chat_chunk(response_id, created, model, i, {"role": "assistant", "content": ""}, None))
            async for i, item in merge_streams(handles):
                if isinstance(item, Completion):
                    done.append(item)
                    for delta in deltas[i].finish():
                        yield sse_event(chat_chunk(response_id, created, model, i, delta, None))
                    reason = finish_reason(openai_finish_reason(item.finish_reason), deltas[i].has_calls)
                    yield sse_event(chat_chunk(response_id, created, model, i, {}, reason))
                else:
                    for delta in deltas[i].push(item):
                        yield sse_event(chat_chunk(response_id, created, model, i, delta, None))
            if request.include_usage:
                usage = usage_body(total_usage(done), ctx.terse_usage())
                yield sse_event(usage_chunk(response_id, created, model, "chat.completion.chunk", usage))
        except Exception as e:  # the status line is gone: report in-band, then end the stream properly
            logger.exception("request %s failed mid-stream", ctx.request_id)
            yield error_event(api_error_from(e).body())
        finally:
            cancel_all(handles)  # runs on client disconnect too (the stream task is cancelled)
        yield DONE_EVENT

    # -- completions, models, tokenizer ------------------------------------------------------------
    async def completions(self, request: CompletionRequest, ctx: RequestContext) -> Response:
        self.check_model(request.model)
        params = constrained(request.params, parse_structured(request.body, chat=False))  # structured.py
        return await complete_prompts(self, dataclasses.replace(request, params=params), ctx)

    async def models(self, ctx: RequestContext) -> Response:
        try:
            max_len: int | None = self.backend.max_model_len
        except UnsupportedOperationError:
            max_len = None
        data = [
            {"id": name, "object": "model", "created": self._created, "owned_by": "terse", "max_model_len": max_len}
            for name in self.model_ids
        ]
        return JSONResponse({"object": "list", "data": data}, headers=ctx.response_headers())

    async def tokenize(self, body: dict[str, Any], ctx: RequestContext) -> Response:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise invalid(f"'prompt' must be a string, got {prompt!r}", "prompt", "invalid_type")
        ids = await run_in_threadpool(self.backend.encode, prompt)
        body_out = {"tokens": ids, "count": len(ids), "max_model_len": self.backend.max_model_len}
        return JSONResponse(body_out, headers=ctx.response_headers())

    async def detokenize(self, body: dict[str, Any], ctx: RequestContext) -> Response:
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise invalid(f"'tokens' must be a list of token ids, got {tokens!r}", "tokens", "invalid_type")
        text = await run_in_threadpool(self.backend.decode, tokens)
        return JSONResponse({"prompt": text}, headers=ctx.response_headers())

    async def aclose(self) -> None:
        await run_in_threadpool(self.backend.close)
