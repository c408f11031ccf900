"""OpenAI response and stream-chunk shapes, and SSE framing."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from terse.backend.types import FinishReason, Usage

logger = logging.getLogger("terse.server")

DONE_EVENT = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""X-Accel-Buffering: no asks reverse proxies (nginx) to pass each chunk on at once."""


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def openai_finish_reason(reason: FinishReason) -> str:
    """OpenAI knows "stop" and "length"; an aborted request (client gone) is reported as "stop"."""
    return "length" if reason == "length" else "stop"


def usage_body(usage: Usage, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }
    if extra:
        body["terse"] = extra
    return body


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def text_chunk(
    response_id: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(response_id: str, created: int, model: str, obj: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": response_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def error_event(error_body: dict[str, Any]) -> bytes:
    """A failure after the stream started: one `{"error": ...}` event (the OpenAI client raises on it)."""
    return sse_event(error_body)


class SSEResponse(StreamingResponse):
    """An SSE stream whose `on_close` runs however the response ends: finished, failed, or the client
    gone, even before the first chunk (when the body generator never starts, so its own `finally`
    would never run). `on_close` must be idempotent: it cancels engine handles or drops an upstream
    connection.
    """

    def __init__(
        self, chunks: AsyncIterator[bytes], headers: dict[str, str], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        self._on_close = on_close
        self._request_id = headers.get("x-request-id", "?")
        self._complete = False

    async def stream_response(self, send: Send) -> None:
        await super().stream_response(send)
        self._complete = True  # every chunk and the end of the body were sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        failed = False
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # how servers on ASGI spec 2.4 report it; logged below
            pass
        except Exception:
            failed = True
            raise
        finally:
            if not self._complete and not failed:  # one line per dropped stream, never a traceback
                logger.info("request %s: client disconnected mid-stream; stream dropped", self._request_id)
            await self._on_close()
