"""A strict OpenAI-compatible test upstream: validates every chat request as a tool-calling API does,
records what it was sent, and answers with a fixed text (whole or streamed, with usage)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ANSWER = "Acme Corp"


def conversation_errors(messages: Any) -> list[str]:
    """What an upstream that validates tool-calling chats rejects (OpenAI's rules, as its 400s state)."""
    if not isinstance(messages, list) or not messages:
        return ["messages must be a non-empty list"]
    errors: list[str] = []
    open_calls: set[str] = set()
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            errors.append(f"messages[{i}].role {role!r} is invalid")
            continue
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            errors.append(f"messages[{i}].content is null without tool_calls")
        if not isinstance(content, str | list | type(None)):
            errors.append(f"messages[{i}].content must be a string or a list of parts")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in open_calls:
                errors.append(f"messages[{i}] with role 'tool' must answer a preceding tool_calls id, got {call_id!r}")
            open_calls.discard(call_id)
            continue
        if open_calls:
            errors.append(f"tool_calls {sorted(open_calls)} have no tool message answering them before messages[{i}]")
            open_calls.clear()
        if role == "assistant":
            open_calls = {c["id"] for c in m.get("tool_calls") or []}
    if open_calls:
        errors.append(f"tool_calls {sorted(open_calls)} are never answered")
    return errors


class ChatUpstream:
    """The upstream's app and what it received (`bodies`, in arrival order)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.bodies.append(body)
        errors = conversation_errors(body.get("messages"))
        if errors:
            error = {"message": "; ".join(errors), "type": "invalid_request_error", "param": "messages", "code": None}
            return JSONResponse({"error": error}, status_code=400)
        prompt_tokens = len(json.dumps(body["messages"])) // 4
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 2, "total_tokens": prompt_tokens + 2}
        head = {"id": "chatcmpl-test", "created": int(time.time()), "model": body.get("model", "m")}
        if body.get("stream"):
            return StreamingResponse(self._chunks(head, usage, body), media_type="text/event-stream")
        message = {"role": "assistant", "content": ANSWER}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})

    async def _chunks(self, head: dict[str, Any], usage: dict[str, Any], body: dict[str, Any]) -> AsyncIterator[bytes]:
        for delta, finish in (({"role": "assistant", "content": "Acme"}, None), ({"content": " Corp"}, "stop")):
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            yield _event({**head, "object": "chat.completion.chunk", "choices": [choice]})
        if (body.get("stream_options") or {}).get("include_usage"):
            event = _event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
            yield event[:17]  # cut mid-event: the proxy must reassemble it
            yield event[17:]
        yield b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
