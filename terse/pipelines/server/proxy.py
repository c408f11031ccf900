"""Proxy mode: forward OpenAI requests to an upstream OpenAI-compatible API after the hooks ran.

- The request body goes upstream as received (unknown fields such as tools or response_format pass
  through) with only `messages` replaced when a hook rewrote them.
- Streams are relayed event by event as the upstream sends them (no re-encoding), checked on the way
  (relay.py): a 2xx body that is not JSON becomes a 502, and a broken stream ends with an error event
  and [DONE]. Accounting travels in the `x-terse-*` headers, and with hooks also as `usage.terse` in
  the stream's usage chunk (that one event re-encoded, `sse_usage.py`). With hooks, whole answers also
  get `usage.terse` and the hooks'
  `on_response`; without hooks they are relayed untouched (headers only).
- Endpoints terse does not handle (`/v1/embeddings`, `/v1/models/{id}`, any other /v1 path) go upstream
  unchanged: method, query, content type and body as received. `/health` asks the upstream's
  `/models` and answers 503 with its state when it is down.
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
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

import httpx
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from terse.backend.openai_http import error_from_body
from terse.pipelines.server.config import ProxyConfig, ServerConfig
from terse.pipelines.server.errors import api_error_from
from terse.pipelines.server.hooks import ChatResult, HookChain, tools_message
from terse.pipelines.server.relay import checked_body, relay_sse
from terse.pipelines.server.schema import ChatRequest, CompletionRequest
from terse.pipelines.server.service import RequestContext, race_disconnect
from terse.pipelines.server.sse import SSEResponse
from terse.pipelines.server.sse_usage import with_terse_usage
from terse.pipelines.server.structured import calls_written_out
from terse.pipelines.server.upstream import Upstream, UpstreamResponse, make_upstream
from terse.pipelines.wrap import estimate_prompt_tokens


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
        self.accounting_alongside = True  # counted while the upstream works; settled before the answer goes out
        if config.tokenizer is not None:
            from terse.backend.openai_tokens import LocalTokenizer

            self._tokenizer = LocalTokenizer(config.tokenizer)

    def count_prompt_tokens(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> int:
        """Tokens of the prompt as sent, earlier tool calls and the request's tool definitions included
        (a `PromptCounter`): exact with `ProxyConfig.tokenizer` (its chat template if any), else
        ~4 characters per token (`wrap.estimate_prompt_tokens`). A template that renders `tool_calls`
        gets the messages as they are; for one that does not (and without a template, and for the
        estimate) the tool calls are written into the assistant's content as call blocks, as terse's
        engine shows them to such a model. Tool definitions: a template that renders `tools` renders
        them; otherwise (the upstream's wording around them unknown) their JSON, one definition a line
        (`hooks.tools_message`), is counted through the same tokenizer or estimate."""
        if self._tokenizer is None:
            return estimate_prompt_tokens(messages, tools)
        template = self._tokenizer.chat_template or ""
        plain = calls_written_out(messages)
        template_tools = tools if "tools" in template else ()
        rendered = self._tokenizer.render_chat(messages if "tool_calls" in template else plain, template_tools)
        texts = [rendered] if rendered is not None else [m["content"] for m in plain]
        if tools and not template_tools:
            texts.append(tools_message(tools)["content"])
        return sum(self._tokenizer.count_tokens(t) for t in texts)

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
        try:
            await ctx.settle_accounting()  # counted while the upstream worked: needed for the headers
        except BaseException:
            await response.aclose()
            raise
        media_type = response.headers.get("content-type", "application/json")
        if stream and response.status_code < 400 and media_type.startswith("text/event-stream"):
            return SSEResponse(self._relay(response, ctx), ctx.response_headers(), on_close=response.aclose)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        if response.status_code >= 500:
            raise api_error_from(error_from_body(response.status_code, content, response.url))
        # 2xx, and 4xx (the client's own mistake): the upstream's status and body, checked to be JSON
        content = checked_body(response.status_code, content, media_type, response.url)
        if response.status_code >= 400 and not media_type.startswith("application/json"):
            media_type = "application/json"  # checked_body wrapped a non-JSON error
        return Response(content, response.status_code, headers=ctx.response_headers(), media_type=media_type)

    async def _relay(self, response: UpstreamResponse, ctx: RequestContext) -> AsyncIterator[bytes]:
        try:  # event by event; a broken stream ends with an error event and [DONE] (relay.py)
            async for chunk in relay_sse(response.aiter_raw(), response.url, ctx.request_id):
                yield chunk
        finally:
            await response.aclose()  # early (client gone): drops the connection, the upstream sees it

    async def _relay_raw(self, response: UpstreamResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:
            await response.aclose()

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

    # -- everything else goes upstream unchanged --------------------------------------------------
    def check_request(self, request: ChatRequest | CompletionRequest) -> None:
        return None  # the upstream decides what it honours

    def engine_stats(self) -> Mapping[str, Any]:
        return {}

    async def model(self, model_id: str, ctx: RequestContext) -> Response:
        return await self._forward("GET", f"/models/{urllib.parse.quote(model_id, safe='/')}", None, ctx, stream=False)

    async def embeddings(self, body: dict[str, Any], ctx: RequestContext) -> Response:
        return await self._forward("POST", "/embeddings", body, ctx, stream=False)

    async def passthrough(self, path: str, body: bytes, ctx: RequestContext) -> Response:
        """Forward method, path, query, content type and body as received; relay the answer as sent."""
        query = ctx.http.url.query
        url = f"{self._base_url}{path}" + (f"?{query}" if query else "")
        headers = self._headers(ctx)
        content_type = ctx.http.headers.get("content-type")
        if content_type:
            headers["content-type"] = content_type
        send = self._upstream.send(ctx.http.method, url, body or None, headers)
        response: UpstreamResponse = await race_disconnect(asyncio.ensure_future(send), ctx.http)
        media_type = response.headers.get("content-type", "application/json")
        if media_type.startswith("text/event-stream") and response.status_code < 400:
            # an endpoint terse does not model may stream any events (no [DONE] rule): relayed as sent
            return SSEResponse(self._relay_raw(response), ctx.response_headers(), on_close=response.aclose)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return Response(content, response.status_code, headers=ctx.response_headers(), media_type=media_type)

    async def health(self) -> tuple[int, dict[str, Any]]:
        """200 when the upstream answers GET /models (any status below 500), else 503 with its state."""
        url = f"{self._base_url}/models"
        headers = {"authorization": f"Bearer {self.config.upstream_api_key}"} if self.config.upstream_api_key else {}
        upstream: dict[str, Any] = {"url": self._base_url}
        try:
            async with httpx.AsyncClient(timeout=self.config.connect_timeout_s) as client:
                answer = await client.get(url, headers=headers)
        except httpx.TimeoutException:
            upstream["status"] = "timeout"
        except httpx.HTTPError as e:
            upstream.update(status="unreachable", error=f"{type(e).__name__}: {e}")
        else:
            upstream.update(status="ok" if answer.status_code < 500 else "error", http_status=answer.status_code)
        ok = upstream["status"] == "ok"
        return (200 if ok else 503), {"status": "ok" if ok else "degraded", "upstream": upstream}

    async def aclose(self) -> None:
        await self._upstream.aclose()

