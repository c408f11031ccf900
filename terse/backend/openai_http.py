"""HTTP plumbing shared by everything that talks to an OpenAI-compatible server.

- `RetryPolicy`: exponential backoff with jitter, honouring `Retry-After`, for failures that happen
  BEFORE the first byte of a response (connection errors, 429, 5xx). A response that has started
  streaming is never retried: its tokens may already have reached the caller.
- `send_with_retries` / `asend_with_retries`: the same retry loop for `httpx.Client` and
  `httpx.AsyncClient`; both return a response opened in streaming mode with a 2xx or final status.
- `iter_sse_data` / `aiter_sse_data`: Server-Sent Events parsing (the `data:` payloads, `[DONE]` ends).
- `error_from_response`: a typed terse error carrying the server's own OpenAI-shaped message.

Used by `terse.backend.openai` (sync, thread per request) and by the server's proxy mode (async).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from terse.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    RemoteRequestError,
    TerseError,
)

logger = logging.getLogger("terse.backend.openai")

RETRYABLE_STATUS_CODES = frozenset({429, 500, 502, 503, 504})
"""Statuses retried before the first byte: rate limited, or the server (or a gateway) failed."""

SSE_DONE = "[DONE]"


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before re-sending a request that failed before any response byte."""

    max_retries: int = 3
    """Re-sends after the first attempt (0 disables retrying)."""
    initial_backoff_s: float = 0.5
    """Wait before the first re-send; doubles on each further attempt."""
    max_backoff_s: float = 8.0
    """Cap on the exponential wait (before jitter)."""
    jitter: float = 0.25
    """Each wait is multiplied by a uniform factor in [1 - jitter, 1 + jitter] so clients spread out."""
    max_retry_after_s: float = 60.0
    """Longest server-requested `Retry-After` honoured; a longer one fails at once instead of waiting."""

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigError(f"max_retries={self.max_retries} must be >= 0 (0 disables retries)")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ConfigError(
                f"backoff must satisfy 0 <= initial_backoff_s ({self.initial_backoff_s}) <= "
                f"max_backoff_s ({self.max_backoff_s})"
            )
        if not 0.0 <= self.jitter < 1.0:
            raise ConfigError(f"jitter={self.jitter} must be in [0, 1), e.g. 0.25")
        if self.max_retry_after_s < 0:
            raise ConfigError(f"max_retry_after_s={self.max_retry_after_s} must be >= 0")

    def backoff_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before re-send number `attempt + 1` (attempt counts from 0).

        A server's `Retry-After` wins over the exponential schedule (it knows its own load).
        """
        if retry_after_s is not None:
            return retry_after_s
        base = min(self.max_backoff_s, self.initial_backoff_s * (2.0**attempt))
        return base * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date); None if absent or unparsable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_delay(
    policy: RetryPolicy, attempt: int, status_code: int | None, retry_after_header: str | None, url: str
) -> float | None:
    """The wait before re-send `attempt + 1`, or None when this failure must not be retried.

    `status_code` None means the request failed without a response (connection error).
    """
    if attempt >= policy.max_retries:
        return None
    retry_after = None
    if status_code is not None:
        if status_code not in RETRYABLE_STATUS_CODES:
            return None
        retry_after = parse_retry_after(retry_after_header)
        if retry_after is not None and retry_after > policy.max_retry_after_s:
            logger.warning(
                "%s asked to retry after %.1f s, more than max_retry_after_s=%.1f; not retrying",
                url, retry_after, policy.max_retry_after_s,
            )
            return None
    return policy.backoff_s(attempt, retry_after)


def _retry_delay(policy: RetryPolicy, attempt: int, response: httpx.Response | None, url: str) -> float | None:
    if response is None:
        return retry_delay(policy, attempt, None, None, url)
    return retry_delay(policy, attempt, response.status_code, response.headers.get("retry-after"), url)


def log_retry(url: str, why: str, attempt: int, policy: RetryPolicy, delay_s: float) -> None:
    logger.warning(
        "retrying %s after %s (retry %d/%d) in %.2f s", url, why, attempt + 1, policy.max_retries, delay_s
    )


def unavailable_error(url: str, e: Exception, num_attempts: int) -> TerseError:
    """The typed error for a request that got no response: timeout (read) or unreachable (else)."""
    return _unavailable(url, e, num_attempts)


def _unavailable(url: str, e: Exception, num_attempts: int) -> TerseError:
    if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
        return BackendTimeoutError(
            f"{url} did not answer in time ({type(e).__name__}); raise the timeout (timeout_s) if the "
            f"server is just slow, or check its load"
        )
    return BackendUnavailableError(
        f"cannot reach {url} after {num_attempts} attempt(s): {type(e).__name__}: {e or 'no detail'}; "
        f"check that the server is running and the base URL (scheme, host, port, /v1) is right"
    )


def send_with_retries(client: httpx.Client, request: httpx.Request, policy: RetryPolicy) -> httpx.Response:
    """Send `request`, re-sending on connection errors, 429 and 5xx; return the final streaming response.

    The caller owns the returned response (close it). Raises `BackendUnavailableError` when the server
    cannot be reached after all attempts and `BackendTimeoutError` when it stops answering (a read
    timeout is not retried: the server may be working on the request).
    """
    url = str(request.url)
    attempt = 0
    while True:
        try:
            response = client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as e:
            delay = _retry_delay(policy, attempt, None, url)
            if delay is None:
                raise _unavailable(url, e, attempt + 1) from e
            why = type(e).__name__
        except httpx.TimeoutException as e:
            raise _unavailable(url, e, attempt + 1) from e
        else:
            delay = _retry_delay(policy, attempt, response, url)
            if delay is None:
                return response
            response.close()
            why = f"HTTP {response.status_code}"
        log_retry(url, why, attempt, policy, delay)
        time.sleep(delay)
        attempt += 1


async def asend_with_retries(
    client: httpx.AsyncClient, request: httpx.Request, policy: RetryPolicy
) -> httpx.Response:
    """Async twin of `send_with_retries` (same rules, same errors)."""
    url = str(request.url)
    attempt = 0
    while True:
        try:
            response = await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as e:
            delay = _retry_delay(policy, attempt, None, url)
            if delay is None:
                raise _unavailable(url, e, attempt + 1) from e
            why = type(e).__name__
        except httpx.TimeoutException as e:
            raise _unavailable(url, e, attempt + 1) from e
        else:
            delay = _retry_delay(policy, attempt, response, url)
            if delay is None:
                return response
            await response.aclose()
            why = f"HTTP {response.status_code}"
        log_retry(url, why, attempt, policy, delay)
        await asyncio.sleep(delay)
        attempt += 1


def _sse_events(lines: Iterable[str]) -> Iterator[str]:
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # "event:", "id:", "retry:" and ":" comment lines carry nothing an OpenAI stream needs
    if data:
        yield "\n".join(data)


def iter_sse_data(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Yield the JSON object of each SSE `data:` event until `[DONE]` (or the end of the body).

    An event holding `{"error": ...}` (a server failing mid-stream) raises `BackendUnavailableError`.
    """
    for payload in _sse_events(response.iter_lines()):
        if payload.strip() == SSE_DONE:
            return
        yield _decode_event(payload, str(response.request.url))


async def aiter_sse_data(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Async twin of `iter_sse_data`."""
    data: list[str] = []
    url = str(response.request.url)
    async for line in response.aiter_lines():
        if line == "" and data:
            payload, data = "\n".join(data), []
            if payload.strip() == SSE_DONE:
                return
            yield _decode_event(payload, url)
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data and "\n".join(data).strip() != SSE_DONE:
        yield _decode_event("\n".join(data), url)


def _decode_event(payload: str, url: str) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except json.JSONDecodeError as e:
        raise BackendUnavailableError(f"{url} sent an SSE event that is not JSON: {payload[:200]!r}") from e
    if not isinstance(event, dict):
        raise BackendUnavailableError(f"{url} sent an SSE event that is not an object: {payload[:200]!r}")
    if "error" in event:
        message = _error_fields(event)[0]
        raise BackendUnavailableError(f"{url} failed mid-stream: {message}")
    return event


def _error_fields(body: Any) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, param, code) from an OpenAI-shaped error body, tolerating other shapes."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        str_or_none = lambda v: None if v is None else str(v)
        return (
            str(err.get("message") or err),
            str_or_none(err.get("type")),
            str_or_none(err.get("param")),
            str_or_none(err.get("code")),
        )
    if isinstance(body, dict) and "detail" in body:  # FastAPI-style servers
        return str(body["detail"]), None, None, None
    if err is not None:
        return str(err), None, None, None
    return str(body), None, None, None


def error_from_response(response: httpx.Response) -> TerseError:
    """A typed error for a non-2xx response (its body must have been read).

    4xx -> `RemoteRequestError` with the server's message; 5xx -> `BackendUnavailableError`.
    """
    return error_from_body(response.status_code, response.content, str(response.request.url))


def error_from_body(status_code: int, content: bytes, url: str) -> TerseError:
    """`error_from_response` for a status and raw body from any HTTP client."""
    try:
        body: Any = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = content[:500].decode("utf-8", "replace")
    message, error_type, param, code = _error_fields(body)
    if 400 <= status_code < 500:
        return RemoteRequestError(
            f"{url} rejected the request (HTTP {status_code}): {message}",
            status_code=status_code,
            error_type=error_type,
            param=param,
            code=code,
        )
    return BackendUnavailableError(f"{url} failed (HTTP {status_code}): {message}")
