"""Proxy mode: forward OpenAI requests to an upstream OpenAI-compatible API after the hooks ran.

- The request body goes upstream as received (unknown fields such as tools or response_format pass
  through) with only `messages` replaced when a hook rewrote them.
- Streams are passed through byte for byte as the upstream sends them (no re-encoding); accounting then
  travels in the `x-terse-*` headers. Whole answers get `usage.terse` too, and the hooks' `on_response`.
- Upstream failures before the first byte are retried (`ProxyConfig.retry`, logged on
  "terse.backend.openai"); then: unreachable -> 502, no answer in time -> 504, 4xx -> passed through.
- Authorization upstream: `upstream_api_key` when set; else the client's own header is forwarded, unless
  terse checks its own api key (that key is terse's, never the upstream's).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse

from terse.backend.openai_http import asend_with_retries, error_from_response
from terse.backend.types import Message
from terse.errors import BackendTimeoutError, BackendUnavailableError
from terse.pipelines.server.config import ProxyConfig, ServerConfig
from terse.pipelines.server.errors import api_error_from
from terse.pipelines.server.hooks import ChatResult, HookChain
from terse.pipelines.server.schema import ChatRequest, CompletionRequest
from terse.pipelines.server.service import RequestContext, race_disconnect
from terse.pipelines.server.sse import DONE_EVENT, SSE_HEADERS, error_event

_TOKENS_PER_MESSAGE = 4
"""Estimate of chat-template overhead per message (role markers, separators) without a tokenizer."""


class ProxyService:
    """Forwards to one upstream. See the module docstring."""

    def __init__(
        self,
        config: ProxyConfig,
        server: ServerConfig,
        hooks: HookChain,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.server = server
        self.hooks = hooks
        self._base_url = config.upstream_url.rstrip("/")
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections),
            transport=transport,
        )
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

    async def _send(self, method: str, url: str, body: Any, ctx: RequestContext) -> httpx.Response:
        content = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = self._headers(ctx)
        if content is not None:
            headers["content-type"] = "application/json"
        request = self._client.build_request(method, url, content=content, headers=headers)
        send = asyncio.ensure_future(asend_with_retries(self._client, request, self.config.retry))
        response: httpx.Response = await race_disconnect(send, ctx.http)
        return response

    async def _forward(self, method: str, path: str, body: Any, ctx: RequestContext, *, stream: bool) -> Response:
        """Send upstream and relay: errors mapped, streams passed through, JSON returned as JSON."""
        response = await self._send(method, f"{self._base_url}{path}", body, ctx)
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            error = error_from_response(response)
            if response.status_code < 500:  # the client's own mistake: its status and message, as sent
                return Response(response.content, response.status_code, headers=ctx.response_headers(),
                                media_type=response.headers.get("content-type", "application/json"))
            raise api_error_from(error)
        if stream and response.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(
                self._relay(response, ctx), media_type="text/event-stream", headers={**SSE_HEADERS, **ctx.response_headers()}
            )
        try:
            await response.aread()
        except httpx.HTTPError as e:
            raise api_error_from(_transport_error(e, str(response.request.url))) from e
        finally:
            await response.aclose()
        return Response(response.content, response.status_code, headers=ctx.response_headers(),
                        media_type=response.headers.get("content-type", "application/json"))

    async def _relay(self, response: httpx.Response, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:  # upstream broke off mid-stream: say so in-band, end properly
            yield error_event(api_error_from(_transport_error(e, str(response.request.url))).body())
            yield DONE_EVENT
        finally:
            await response.aclose()

    # -- endpoints -------------------------------------------------------------------------------
    async def chat(self, request: ChatRequest, ctx: RequestContext) -> Response:
        forwarded = await self._forward("POST", "/chat/completions", request.upstream_body(), ctx, stream=request.stream)
        if request.stream or forwarded.status_code >= 400:
            return forwarded
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
        root = self._base_url.removesuffix("/v1")
        response = await self._send("POST", f"{root}{path}", body, ctx)
        content = await response.aread()
        await response.aclose()
        return Response(content, response.status_code, headers=ctx.response_headers(),
                        media_type=response.headers.get("content-type", "application/json"))

    async def aclose(self) -> None:
        await self._client.aclose()


def _transport_error(e: httpx.HTTPError, url: str) -> Exception:
    if isinstance(e, httpx.TimeoutException):
        return BackendTimeoutError(f"{url} stopped sending for longer than the timeout: {type(e).__name__}")
    return BackendUnavailableError(f"{url} broke off the response: {type(e).__name__}: {e}")
