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
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from terse.backend.base import Backend
from terse.backend.handle import RequestHandle
from terse.backend.types import Completion, SamplingParams, TokenLogprob
from terse.errors import TerseError, UnsupportedOperationError
from terse.pipelines.server.completions import complete_prompts
from terse.pipelines.server.config import ServerConfig
from terse.pipelines.server.embeddings import EmbeddingService
from terse.pipelines.server.errors import ApiError, api_error_from, invalid
from terse.pipelines.server.handles import (
    cancel_all,
    choice_params,
    fit_params,
    merge_streams,
    submitted_prompt_len,
    total_usage,
    wait_handle,
)
from terse.pipelines.server.hooks import ChatResult, HookChain
from terse.pipelines.server.logprobs import TokenTexts, chat_logprobs
from terse.pipelines.server.params import check_supported
from terse.pipelines.server.schema import ChatRequest, CompletionRequest, parse_chat
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
    calls_written_out,
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
    accounting_alongside = False  # the sent prompt's count sizes max_tokens before generation starts

    def __init__(
        self, backend: Backend, config: ServerConfig, hooks: HookChain, embedder: EmbeddingService | None = None
    ) -> None:
        self.backend = backend
        self.config = config
        self.hooks = hooks
        self.embedder = embedder
        self.model_ids = config.served_model_names or (backend.model_name,)
        self._created = int(time.time())
        self.chat_unavailable = _chat_template_problem(backend)
        """Why chat cannot be served (the model has no chat template), or None."""
        if self.chat_unavailable:
            logger.warning("chat requests will be refused: %s", self.chat_unavailable)

    # -- helpers ---------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this server serves {list(self.model_ids)} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def count_prompt_tokens(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> int:
        """The prompt the messages make as the backend holds it (a `PromptCounter`): the chat template
        over them with earlier tool calls written out, as `chat` renders them, plus the special tokens
        the backend adds on submit (BOS), so the accounting headers agree with `usage.prompt_tokens`.
        `tools` are not counted here: the tool prompt this engine renders for them depends on
        `tool_choice` and comes on top in `chat`, which counts it (`_prompt_tokens`)."""
        return submitted_prompt_len(self.backend, self.backend.render_chat(calls_written_out(messages)))

    async def _prompt_tokens(self, prompt: str, ctx: RequestContext, structured: StructuredRequest | None) -> int:
        """Tokens of the rendered prompt as the backend will hold them (special tokens such as BOS
        included, `submitted_prompt_len`), which size max_tokens. The hooks' accounting already counted
        the sent messages that way; a request with callable tools also carries the tool prompt, so its
        prompt is counted whole and the tool prompt added to both sides of the accounting and to the
        server's token counters (`RequestContext.add_prompt_tokens`; the saving is unchanged)."""
        tools = structured is not None and structured.tools is not None
        if ctx.accounting is not None and not tools:
            return ctx.accounting.sent_prompt_tokens
        num_held = await run_in_threadpool(submitted_prompt_len, self.backend, prompt)
        if ctx.accounting is not None:
            ctx.add_prompt_tokens(num_held - ctx.accounting.sent_prompt_tokens)
        return num_held

    def _submit(self, prompt: str | Sequence[int], params: SamplingParams, n: int) -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for i in range(n):
                handles.append(self.backend.submit(prompt, choice_params(params, i)))
        except Exception:
            cancel_all(handles)
            raise
        return handles

    def check_request(self, request: ChatRequest | CompletionRequest) -> None:
        """Before any hook runs: the model is served and every parameter can be honoured (else 4xx)."""
        self.check_model(request.model)
        check_supported(request.body, "chat" if isinstance(request, ChatRequest) else "completions")
        if isinstance(request, ChatRequest) and self.chat_unavailable:
            raise invalid(
                f"{self.chat_unavailable}; use /v1/completions with a prompt you render yourself",
                "messages",
                "no_chat_template",
            )

    # -- chat ------------------------------------------------------------------------------------
    async def chat(self, request: ChatRequest, ctx: RequestContext) -> Response:
        self.check_request(request)
        structured = parse_structured(request.body)  # response_format / tools (structured.py)
        messages = prompt_messages(request.messages, request.body.get("messages"), structured)
        prompt = await run_in_threadpool(self.backend.render_chat, messages)
        num_prompt = await self._prompt_tokens(prompt, ctx, structured)
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
        logprobs = await run_in_threadpool(self._logprobs_bodies, completions)
        choices = [
            {
                "index": i,
                "message": message,
                "logprobs": lp,
                "finish_reason": finish_reason(openai_finish_reason(c.finish_reason), has_calls),
            }
            for i, ((message, has_calls), c, lp) in enumerate(zip(messages_out, completions, logprobs))
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
        seen = [0] * len(handles)  # logprob entries already sent, per choice
        texts = TokenTexts(self.backend.decode)

        def new_logprobs(i: int, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
            if request.params.logprobs is None:
                return None
            seen[i] += len(entries)
            return chat_logprobs(entries, texts)

        try:
            for i in range(len(handles)):
                yield sse_event(chat_chunk(response_id, created, model, i, {"role": "assistant", "content": ""}, None))
            async for i, item in merge_streams(handles):
                if isinstance(item, Completion):
                    done.append(item)
                    for delta in deltas[i].finish():
                        entries = new_logprobs(i, (item.logprobs or ())[seen[i] :])
                        yield sse_event(chat_chunk(response_id, created, model, i, delta, None, entries))
                    reason = finish_reason(openai_finish_reason(item.finish_reason), deltas[i].has_calls)
                    rest = new_logprobs(i, (item.logprobs or ())[seen[i] :])
                    yield sse_event(chat_chunk(response_id, created, model, i, {}, reason, rest))
                else:
                    for delta in deltas[i].push(item):  # logprobs ride on the delta that carries their text
                        entries = new_logprobs(i, handles[i].logprobs_since(seen[i]))
                        yield sse_event(chat_chunk(response_id, created, model, i, delta, None, entries))
            if request.include_usage:
                usage = usage_body(total_usage(done), ctx.terse_usage())
                yield sse_event(usage_chunk(response_id, created, model, "chat.completion.chunk", usage))
        except Exception as e:  # the status line is gone: report in-band, then end the stream properly
            logger.exception("request %s failed mid-stream", ctx.request_id)
            yield error_event(api_error_from(e).body())
        finally:
            cancel_all(handles)  # runs on client disconnect too (the stream task is cancelled)
        yield DONE_EVENT

    def _logprobs_bodies(self, completions: Sequence[Completion]) -> list[dict[str, Any] | None]:
        texts = TokenTexts(self.backend.decode)
        return [None if c.logprobs is None else chat_logprobs(c.logprobs, texts) for c in completions]

    # -- completions, models, tokenizer ------------------------------------------------------------
    async def completions(self, request: CompletionRequest, ctx: RequestContext) -> Response:
        self.check_request(request)
        params = constrained(request.params, parse_structured(request.body, chat=False))  # structured.py
        return await complete_prompts(self, dataclasses.replace(request, params=params), ctx)

    def _model_entries(self) -> list[dict[str, Any]]:
        try:
            max_len: int | None = self.backend.max_model_len
        except UnsupportedOperationError:
            max_len = None
        entry = {"object": "model", "created": self._created, "owned_by": "terse"}
        data = [{"id": name, **entry, "max_model_len": max_len} for name in self.model_ids]
        if self.embedder is not None:
            data.append({"id": self.embedder.model_id, **entry, "kind": "embedding"})  # OpenAIBackend skips it
        return data

    async def models(self, ctx: RequestContext) -> Response:
        return JSONResponse({"object": "list", "data": self._model_entries()}, headers=ctx.response_headers())

    async def model(self, model_id: str, ctx: RequestContext) -> Response:
        for entry in self._model_entries():
            if entry["id"] == model_id:
                return JSONResponse(entry, headers=ctx.response_headers())
        served = [e["id"] for e in self._model_entries()]
        raise ApiError(404, f"model {model_id!r} is not served here; this server serves {served}", param="model",
                       code="model_not_found")

    async def embeddings(self, body: dict[str, Any], ctx: RequestContext) -> Response:
        if self.embedder is None:
            raise ApiError(404, "this server embeds nothing: it was started without an embedding model",
                           code="not_found")
        return JSONResponse(await run_in_threadpool(self.embedder.embed, body), headers=ctx.response_headers())

    async def passthrough(self, path: str, body: bytes, ctx: RequestContext) -> Response:
        raise ApiError(
            404,
            f"{ctx.http.method} /v1{path} is not served here; terse serves /v1/chat/completions, /v1/completions, "
            f"/v1/embeddings and /v1/models",
            code="not_found",
        )

    def engine_stats(self) -> Mapping[str, Any]:
        stats = getattr(self.backend, "stats", None)
        return stats if isinstance(stats, Mapping) else {}

    async def health(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "ok"}

    async def tokenize(self, body: dict[str, Any], ctx: RequestContext) -> Response:
        """`{"prompt": text}`, or `{"messages": [...]}` rendered with the chat template first."""
        if "messages" in body:
            if body.get("add_generation_prompt", True) is not True:
                raise invalid("'add_generation_prompt' must be true (or absent)", "add_generation_prompt")
            request = parse_chat({"model": self.model_ids[0], "messages": body["messages"]}, self.config)
            prompt: Any = await run_in_threadpool(self.backend.render_chat, request.messages)
        else:
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


def _chat_template_problem(backend: Backend) -> str | None:
    """Why `backend` cannot render chat (it has no chat template), or None when it can."""
    try:
        backend.render_chat([{"role": "user", "content": "ping"}])
    except (TerseError, ValueError) as e:  # ModelLoadError / UnsupportedOperationError: no template, no tokenizer
        return str(e).split(";")[0]
    return None
