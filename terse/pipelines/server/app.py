"""The FastAPI application: routes, auth, limits, request ids, hooks, accounting and OpenAI-shaped errors.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (no auth: for
load balancers), POST /tokenize and /detokenize (the vLLM-style token endpoints). Every answer carries
`x-request-id` (the client's when it sent a usable one). Every error is `{"error": {...}}` with the
status OpenAI would use; FastAPI's own 422 validation answers become 400s.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from terse.pipelines.server.config import ServerConfig
from terse.pipelines.server.errors import ApiError, api_error_from, invalid
from terse.pipelines.server.hooks import HookChain
from terse.pipelines.server.schema import parse_chat, parse_completion
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
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise invalid(f"the request body is not valid JSON: {e}", None, "invalid_json") from e


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
    _install_error_handlers(app)
    _add_routes(app, service, config, hooks, gate)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's `{"error": {...}}` with the request id."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> Response:
        if e.status_code >= 500:
            logger.warning("request %s: %s", getattr(request.state, "request_id", "?"), e.message)
        return _error_response(request, e)

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


def _add_routes(app: FastAPI, service: ChatService, config: ServerConfig, hooks: HookChain, gate: _Gate) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await service.models(gate.context(request))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        ctx = gate.context(request)
        original = parse_chat(await gate.json_body(request), config)
        sent = await run_in_threadpool(hooks.on_request, original) if hooks else original
        if original.text_only:
            args = (original, sent, service.count_prompt_tokens, service.cheap_counting)  # cheap: an estimate
            # counting may tokenize a long prompt: off the event loop unless the service says it is cheap
            ctx.accounting = (
                hooks.account(*args) if service.cheap_counting else await run_in_threadpool(hooks.account, *args)
            )
        return await _answer(service.chat(sent, ctx), ctx)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        ctx = gate.context(request)
        parsed = parse_completion(await gate.json_body(request), config)
        return await _answer(service.completions(parsed, ctx), ctx)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        ctx = gate.context(request)
        return await service.tokenize(_object(await gate.json_body(request)), ctx)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        ctx = gate.context(request)
        return await service.detokenize(_object(await gate.json_body(request)), ctx)


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
