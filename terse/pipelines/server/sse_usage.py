"""Accounting in proxied streams: `usage.terse` added to the usage chunk of an upstream SSE stream.

The proxy relays streams as the upstream sends them. With hooks on, the event whose JSON carries a
`usage` object (OpenAI-compatible servers send it last when `stream_options.include_usage` is set) is
re-encoded with `usage.terse` added, so a streamed answer reports the same saved tokens as the
`x-terse-*` headers. Every other event passes byte for byte, each as soon as it is complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


async def with_terse_usage(chunks: AsyncIterator[bytes], fields: Mapping[str, Any]) -> AsyncIterator[bytes]:
    """`chunks` (raw SSE bytes, cut anywhere) with `fields` added as `usage.terse` to usage events."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        events: list[bytes] = []
        while (end := _EVENT_END.search(pending)) is not None:
            events.append(add_terse_usage(pending[: end.end()], fields))
            pending = pending[end.end() :]
        if events:
            yield b"".join(events)
    if pending:
        yield pending  # an unterminated tail: passed on as received


def add_terse_usage(event: bytes, fields: Mapping[str, Any]) -> bytes:
    """One complete SSE event, with `usage.terse` added when its data is a JSON object with a usage
    object; any other event (text deltas, [DONE], errors, comments) is returned unchanged."""
    if b'"usage"' not in event:
        return event
    body = event.rstrip(b"\r\n")
    terminator = event[len(body) :]
    lines = body.splitlines()
    data = [n for n, line in enumerate(lines) if line.startswith(b"data:")]
    if len(data) != 1:
        return event
    try:
        payload = json.loads(lines[data[0]][5:])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return event
    if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
        return event
    payload["usage"]["terse"] = dict(fields)
    lines[data[0]] = b"data: " + json.dumps(payload, separators=(",", ":")).encode()
    return b"\n".join(lines) + terminator
