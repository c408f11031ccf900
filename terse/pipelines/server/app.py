"""The FastAPI application: routes, auth, limits, request ids, hooks, accounting and OpenAI-shaped errors.

Routes: POST /v1/chat/completions, /v1/completions and /v1/embeddings, GET /v1/models and
/v1/models/{id}, POST /tokenize and /detokenize (the vLLM-style token endpoints), and, without auth (for
load balancers and scrapers), GET /health (proxy mode: with the upstream's state) and GET /metrics
(Prometheus text). Any other /v1 path is forwarded unchanged in proxy mode and a 404 in engine mode.
A chat or completions parameter the mode cannot honour is refused (400) before any hook runs.
Every answer carries `x-request-id` (the client's when it sent a usable one). Every error is
`{"error": {...}}` with the status OpenAI would use; FastAPI's own 422 validation answers become 400s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from terse.errors import TerseError
from terse.pipelines.server.config import ServerConfig
from terse.pipelines.server.errors import ApiError, api_error_from, invalid, log_api_error
from terse.pipelines.server.hooks import HookChain, PromptAccounting, PromptCounter, counting_tools
from terse.pipelines.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from terse.pipelines.server.metrics import MetricsMiddleware, ServerMetrics
from terse.pipelines.server.request_body import parse_json_body
from terse.pipelines.server.schema import ChatRequest, parse_chat, parse_completion
from terse.pipelines.server.service import ChatService, ClientGoneError, RequestContext

logger = logging.getLogger("terse.server")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


class _Gate:
    """Per-request checks shared by every route: request id, API key, body size, JSON."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._key = config.api_key.encode() if config.api_key else None

    def context(self, request: Request) -> RequestContext:
        ctx = RequestContext(_request_id(request), request, client_authorization=request.headers.get("authorization"))
        request.state.request_id = ctx.request_id
        if self._key is not None:
            auth = request.headers.get("authorization", "")
            token = auth[7:].encode() if auth[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, self._key):
                raise ApiError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>' with the key this server was "
                    "started with (--api-key or TERSE_API_KEY)",
                    code="invalid_api_key",
                )
        return ctx

    async def json_body(self, request: Request) -> Any:
        return parse_json_body(await self.raw_body(request))

    async def raw_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is {size}+ bytes, more than this server's limit of {limit} bytes "
        f"(--max-body-bytes); send less context or compress it",
        code="request_too_large",
    )


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    headers = {"x-request-id": getattr(request.state, "request_id", None) or _request_id(request)}
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


def create_app(service: ChatService, config: ServerConfig, hooks: HookChain | None = None) -> FastAPI:
    """The ASGI app serving `service` (an `EngineService` or a `ProxyService`) under `config`'s limits."""
    hooks = hooks or HookChain()
    gate = _Gate(config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.aclose()

    app = FastAPI(title="terse", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = ServerMetrics(service.engine_stats)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _install_error_handlers(app)
    _add_routes(app, service, config, hooks, gate, metrics)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's `{"error": {...}}` with the request id."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> Response:
        log_api_error(logger, getattr(request.state, "request_id", "?"), e)
        return _error_response(request, e)

    # terse's own errors are expected (a client's bad prompt, an upstream down): one log line each, and
    # handled here rather than by the catch-all below, which the ASGI server would log with a traceback
    @app.exception_handler(TerseError)
    async def on_terse_error(request: Request, e: TerseError) -> Response:
        error = api_error_from(e)
        log_api_error(logger, getattr(request.state, "request_id", "?"), error)
        return _error_response(request, error)

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(request: Request, e: ClientDisconnect) -> Response:
        request_id = getattr(request.state, "request_id", None) or _request_id(request)
        logger.info("request %s: client disconnected before its request body arrived", request_id)
        return Response(status_code=499, headers={"x-request-id": request_id})

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError) -> Response:
        return _error_response(request, invalid(f"invalid request: {e.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> Response:
        return _error_response(request, ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def on_other(request: Request, e: Exception) -> Response:
        error = api_error_from(e)
        log = logger.exception if error.status_code == 500 else logger.warning
        log("request %s failed: %s", getattr(request.state, "request_id", "?"), e)
        return _error_response(request, error)


def _add_routes(
    app: FastAPI, service: ChatService, config: ServerConfig, hooks: HookChain, gate: _Gate, metrics: ServerMetrics
) -> None:
    @app.get("/health")
    async def health() -> Response:
        status, body = await service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(await run_in_threadpool(metrics.render), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await service.models(gate.context(request))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        return await service.model(model_id, gate.context(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        ctx = gate.context(request)
        original = parse_chat(await gate.json_body(request), config)
        service.check_request(original)  # a parameter the mode cannot honour fails before any hook runs
        count, cheap = counting_tools(service.count_prompt_tokens), service.cheap_counting  # cheap: an estimate
        ctx.count_added_tokens = metrics.add_prompt_tokens  # what the mode adds to the prompt later (tool prompt)
        counting = None
        if original.text_only and not cheap:
            # tokenize the original prompt while the hooks rewrite it (the tokenizer releases the GIL)
            counting = asyncio.ensure_future(run_in_threadpool(count, original.prompt_messages(), original.prompt_tools()))
            counting.add_done_callback(_retrieved)
        sent = await run_in_threadpool(hooks.on_request, original) if hooks else original
        if counting is not None:
            pending = asyncio.ensure_future(_account(hooks, metrics, original, sent, count, counting))
            pending.add_done_callback(_retrieved)
            if service.accounting_alongside:
                ctx.pending_accounting = pending  # counted while the request is served; settled before the answer
            else:
                ctx.accounting = await pending
        elif original.text_only:  # an estimate: cheap enough for the event loop
            ctx.accounting = hooks.account(original, sent, count, True)
            metrics.account(ctx.accounting)
        return await _answer(service.chat(sent, ctx), ctx)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        ctx = gate.context(request)
        parsed = parse_completion(await gate.json_body(request), config)
        service.check_request(parsed)
        return await _answer(service.completions(parsed, ctx), ctx)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        ctx = gate.context(request)
        return await service.embeddings(_object(await gate.json_body(request)), ctx)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        ctx = gate.context(request)
        return await service.tokenize(_object(await gate.json_body(request)), ctx)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        ctx = gate.context(request)
        return await service.detokenize(_object(await gate.json_body(request)), ctx)

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def other(path: str, request: Request) -> Response:
        """Endpoints terse does not handle: proxy mode forwards them unchanged, engine mode answers 404."""
        ctx = gate.context(request)
        return await service.passthrough(f"/{path}", await gate.raw_body(request), ctx)


async def _account(
    hooks: HookChain, metrics: ServerMetrics, original: ChatRequest, sent: ChatRequest, count: PromptCounter,
    counting: asyncio.Future[int],
) -> PromptAccounting:
    """A chat request's accounting once the original's count (`counting`) is in; counts the sent prompt."""
    accounting = await run_in_threadpool(hooks.account, original, sent, count, False, await counting)
    metrics.account(accounting)
    return accounting


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Done callback: a request that failed before settling its accounting leaves no unretrieved error."""
    if not future.cancelled():
        future.exception()


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_type")
    return body


async def _answer(work: Any, ctx: RequestContext) -> Response:
    try:
        response: Response = await work
    except ClientGoneError:
        logger.info("request %s: client disconnected; its generation was cancelled", ctx.request_id)
        return Response(status_code=499, headers={"x-request-id": ctx.request_id})
    return response
