"""What proxy mode relays from its upstream is checked: a client gets a well-formed answer or a clear
error, never a garbled or truncated one passed on as a success.

- Whole answers (`checked_body`): a 2xx whose body is not JSON (a gateway's HTML page, an empty body)
  becomes a 502 naming the upstream's status and a short excerpt. A 4xx that is not JSON keeps its
  status, with the excerpt wrapped in OpenAI's error shape.
- Streams (`relay_sse`): events are passed on unchanged, each as soon as it is complete (ended by a
  blank line). An event that is not SSE or whose data is neither JSON nor `[DONE]`, a stream cut off
  mid-event or ending without `[DONE]`, and a transport failure all end the client's stream with one
  error event and `[DONE]`. A partial event is never sent, so the error event always stands alone
  after a blank line, where SSE clients see it.

      upstream bytes:  data: {..}\\n\\n data: {..}\\n\\n data: {"cho      <- connection lost
      client gets:     data: {..}\\n\\n data: {..}\\n\\n data: {"error": ..}\\n\\n data: [DONE]\\n\\n
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator

from terse.errors import BackendUnavailableError
from terse.pipelines.server.errors import ApiError, api_error_from
from terse.pipelines.server.sse import DONE_EVENT, error_event

logger = logging.getLogger("terse.server")

_EVENT_END = re.compile(rb"\n\r?\n")
"""A blank line ends an event (LF or CRLF line endings)."""
_SSE_FIELDS = (b"data", b"event", b"id", b"retry")
EXCERPT_CHARS = 160
"""Characters of a bad upstream body quoted in the error message."""


def excerpt(content: bytes) -> str:
    """The start of a body for an error message: decoded leniently, whitespace collapsed, cut short."""
    text = " ".join(content[: EXCERPT_CHARS * 4].decode("utf-8", "replace").split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def checked_body(status_code: int, content: bytes, content_type: str, url: str) -> bytes:
    """The body to relay for an upstream answer below 500 (see the module docstring)."""
    try:
        json.loads(content)
    except (ValueError, RecursionError):
        shown = f"{len(content)} bytes of {content_type or 'no content type'}: {excerpt(content)!r}"
        if status_code < 400:
            raise ApiError(
                502,
                f"the upstream {url} answered HTTP {status_code} with a body that is not JSON ({shown}); "
                f"check that the upstream URL points at an OpenAI-compatible API",
                code="upstream_invalid_response",
            ) from None
        body = ApiError(status_code, f"the upstream {url} answered HTTP {status_code}: {shown}", code="upstream_error")
        return json.dumps(body.body()).encode()
    return content


def _event_problem(event: bytes) -> tuple[bool, str | None]:
    """(is [DONE], what is wrong with the event or None). Comments and non-data fields are fine."""
    data: list[bytes] = []
    for line in event.splitlines():
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if name not in _SSE_FIELDS:
            return False, f"a line that is not server-sent events: {excerpt(line)!r}"
        if name == b"data":
            data.append(value[1:] if value.startswith(b" ") else value)
    if not data:
        return False, None
    payload = b"\n".join(data)
    if payload.strip() == b"[DONE]":
        return True, None
    try:
        parsed = json.loads(payload)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        return False, f"an event whose data is not a JSON object: {excerpt(payload)!r}"
    return False, None


def _split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """(complete events, the incomplete rest)."""
    events: list[bytes] = []
    start = 0
    for match in _EVENT_END.finditer(buffer):
        events.append(buffer[start : match.end()])
        start = match.end()
    return events, buffer[start:]


async def relay_sse(chunks: AsyncIterator[bytes], url: str, request_id: str) -> AsyncIterator[bytes]:
    """Relay an upstream SSE stream event by event, ending a broken one properly (module docstring)."""
    rest = b""
    done = False
    problem: str | None = None
    try:
        async for chunk in chunks:
            if done:  # after [DONE] nothing is parsed any more
                yield chunk
                continue
            events, rest = _split_events(rest + chunk)
            good: list[bytes] = []
            for event in events:
                is_done, problem = _event_problem(event)
                if problem is not None:
                    break
                good.append(event)
                done = done or is_done
            if good:
                yield b"".join(good)
            if problem is not None:
                break
        else:
            if not done:
                problem = (
                    f"the stream was cut off mid-event ({excerpt(rest)!r})"
                    if rest.strip()
                    else "the stream ended without [DONE]"
                )
    except BackendUnavailableError as e:  # broke off or stalled mid-stream
        error = api_error_from(e)
        logger.warning("request %s: upstream stream failed: %s", request_id, error.message)
        yield error_event(error.body())
        yield DONE_EVENT
        return
    if problem is not None:
        error = ApiError(502, f"the upstream {url} sent a broken stream: {problem}", code="upstream_invalid_response")
        logger.warning("request %s: %s", request_id, error.message)
        yield error_event(error.body())
        yield DONE_EVENT
