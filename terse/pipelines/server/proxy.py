"""Proxy mode: forward OpenAI requests to an upstream OpenAI-compatible API after the hooks ran.

- The request body goes upstream as received (unknown fields such as tools or response_format pass
  through) with only `messages` replaced when a hook rewrote them.
- Streams are passed through byte for byte as the upstream sends them; accounting travels in the
  `x-terse-*` headers, and with hooks also as `usage.terse` in the stream's usage chunk (that one event
  re-encoded, `sse_usage.py`). With hooks, whole answers also get `usage.terse` and the hooks'
  `on_response`; without hooks they are relayed untouched (headers only).
- Upstream failures before the first byte are retried (`ProxyConfig.retry`, logged on
  "terse.backend.openai"); then: unreachable -> 502, no answer in time -> 504, 4xx -> passed through.
- The upstream client is an `Upstream` transport (`upstream.py`): a lean h11 keep-alive pool for
  http:// upstreams, httpx for https://. A client that disconnects makes the proxy drop its upstream
  connection, so the upstream stops generating too.
- Authorization upstream: `upstream_api_key` when set; else the client's own header is forwarded, unless
  terse checks its own api key (that key is terse's, never the upstream's).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from terse.backend.openai_http import error_from_body
from terse.backend.types import Message
from terse.errors import BackendUnavailableError
from terse.pipelines.server.config import ProxyConfig, ServerConfig
from terse.pipelines.server.errors import api_error_from
from terse.pipelines.server.hooks import ChatResult, HookChain
from terse.pipelines.server.schema import ChatRequest, CompletionRequest
from terse.pipelines.server.service import RequestContext, race_disconnect
from terse.pipelines.server.sse import DONE_EVENT, SSEResponse, error_event
from terse.pipelines.server.sse_usage import with_terse_usage
from terse.pipelines.server.upstream import Upstream, UpstreamResponse, make_upstream

_TOKENS_PER_MESSAGE = 4
"""Estimate of chat-template overhead per message (role markers, separators) without a tokenizer."""


class ProxyService:
    """Forwards to one upstream. See the module docstring."""

    def __init__(
        self, config: ProxyConfig, server: ServerConfig, hooks: HookChain, *, upstream: Upstream | None = None
    ) -> None:
        self.config = config
        self.server = server
        self.hooks = hooks
        self._base_url = config.upstream_url.rstrip("/")
        self._upstream = upstream if upstream is not None else make_upstream(config)
        self._tokenizer: Any = None
        self.cheap_counting = config.tokenizer is None
        if config.tokenizer is not None:
            from terse.backend.openai_tokens import LocalTokenizer

            self._tokenizer = LocalTokenizer(config.tokenizer)

    def count_prompt_tokens(self, messages: Sequence[Message]) -> int:
        """Exact with `ProxyConfig.tokenizer` (its chat template if any), else ~4 characters per token."""
        if self._tokenizer is not None:
            rendered = self._tokenizer.render_chat(messages)
            texts = [rendered] if rendered is not None else [m["content"] for m in messages]
            return sum(self._tokenizer.count_tokens(t) for t in texts)
        return sum(math.ceil(len(m["content"]) / 4) + _TOKENS_PER_MESSAGE for m in messages)

    # -- transport -------------------------------------------------------------------------------
    def _headers(self, ctx: RequestContext) -> dict[str, str]:
        headers = {"x-request-id": ctx.request_id}
        if self.config.upstream_api_key:
            headers["authorization"] = f"Bearer {self.config.upstream_api_key}"
        elif self.server.api_key is None and ctx.client_authorization:
            headers["authorization"] = ctx.client_authorization
        return headers

    async def _send(self, method: str, url: str, body: Any, ctx: RequestContext) -> UpstreamResponse:
        content = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = self._headers(ctx)
        if content is not None:
            headers["content-type"] = "application/json"
        send = asyncio.ensure_future(self._upstream.send(method, url, content, headers))
        response: UpstreamResponse = await race_disconnect(send, ctx.http)
        return response

    async def _forward(
        self, method: str, path: str, body: Any, ctx: RequestContext, *, stream: bool, root: bool = False
    ) -> Response:
        """Send upstream and relay: errors mapped, streams passed through, JSON returned as JSON.

        `root` addresses the server root (`/tokenize`) instead of the API root (`/v1/...`).
        """
        base = self._base_url.removesuffix("/v1") if root else self._base_url
        response = await self._send(method, f"{base}{path}", body, ctx)
        media_type = response.headers.get("content-type", "application/json")
        if stream and response.status_code < 400 and media_type.startswith("text/event-stream"):
            return SSEResponse(self._relay(response), ctx.response_headers(), on_close=response.aclose)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        if response.status_code >= 500:
            raise api_error_from(error_from_body(response.status_code, content, response.url))
        # 2xx, and 4xx (the client's own mistake): the upstream's status and body, as sent
        return Response(content, response.status_code, headers=ctx.response_headers(), media_type=media_type)

    async def _relay(self, response: UpstreamResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except BackendUnavailableError as e:  # upstream broke off or stalled mid-stream: say so in-band
            yield error_event(api_error_from(e).body())
            yield DONE_EVENT
        finally:
            await response.aclose()  # early (client gone): drops the connection, the upstream sees it

    # -- endpoints -------------------------------------------------------------------------------
    async def chat(self, request: ChatRequest, ctx: RequestContext) -> Response:
        forwarded = await self._forward("POST", "/chat/completions", request.upstream_body(), ctx, stream=request.stream)
        if isinstance(forwarded, SSEResponse) and self.hooks and ctx.accounting is not None:
            # the usage chunk reports what the headers report
            relayed = cast(AsyncIterator[bytes], forwarded.body_iterator)
            forwarded.body_iterator = with_terse_usage(relayed, ctx.accounting.usage_fields())
        if request.stream or forwarded.status_code >= 400 or not self.hooks:
            return forwarded  # no hooks: nothing saved, the x-terse-* headers say so without re-encoding
        return await self._finish_chat(forwarded, request, ctx)

    async def _finish_chat(self, forwarded: Response, request: ChatRequest, ctx: RequestContext) -> Response:
        try:
            body = json.loads(bytes(forwarded.body))
            choices = body["choices"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return forwarded  # not an OpenAI answer: relay as is rather than guess
        if self.hooks and isinstance(choices, list):
            texts = ChatResult(tuple(str((c.get("message") or {}).get("content") or "") for c in choices))
            texts = await run_in_threadpool(self.hooks.on_response, request, texts)
            for choice, text in zip(choices, texts.texts):
                choice.setdefault("message", {})["content"] = text
        if isinstance(body.get("usage"), dict) and ctx.accounting is not None:
            body["usage"]["terse"] = ctx.accounting.usage_fields()
        return JSONResponse(body, forwarded.status_code, headers=ctx.response_headers())

    async def completions(self, request: CompletionRequest, ctx: RequestContext) -> Response:
        return await self._forward("POST", "/completions", dict(request.body), ctx, stream=request.stream)

    async def models(self, ctx: RequestContext) -> Response:
        return await self._forward("GET", "/models", None, ctx, stream=False)

    async def tokenize(self, body: dict[str, Any], ctx: RequestContext) -> Response:
        return await self._forward_root("/tokenize", body, ctx)

    async def detokenize(self, body: dict[str, Any], ctx: RequestContext) -> Response:
        return await self._forward_root("/detokenize", body, ctx)

    async def _forward_root(self, path: str, body: dict[str, Any], ctx: RequestContext) -> Response:
        return await self._forward("POST", path, body, ctx, stream=False, root=True)

    async def aclose(self) -> None:
        await self._upstream.aclose()

