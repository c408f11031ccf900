"""How proxy mode talks to its upstream: one Protocol, two transports.

- `HttpxUpstream`: httpx; any URL (https, HTTP proxies from the environment). ~2 ms of CPU per request.
- `H11Upstream`: plain `http://` only; a keep-alive connection pool over asyncio streams speaking
  HTTP/1.1 through h11 directly. About 6x less CPU per request than httpx, which is most of what a
  proxy adds on a fast upstream (see docs/benchmarks.md).

Both retry failures before the first response byte per `RetryPolicy` (logged on "terse.backend.openai")
and raise `BackendUnavailableError` / `BackendTimeoutError`, also from `aiter_raw()` mid-stream.
Closing a response that was not read to the end drops its connection, so the upstream sees the client
go away (and a terse or vLLM upstream cancels the generation).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import h11
import httpx

from terse.backend.openai_http import asend_with_retries, log_retry, retry_delay, unavailable_error
from terse.errors import BackendTimeoutError, BackendUnavailableError, ConfigError
from terse.pipelines.server.config import ProxyConfig


class UpstreamResponse(Protocol):
    """A response whose status and headers have arrived; the body is read (once) through it."""

    status_code: int
    headers: Mapping[str, str]
    """Header names in lower case."""
    url: str

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> UpstreamResponse:
        """Send with retries before the first byte; the caller must `aclose()` the response."""
        ...

    async def aclose(self) -> None: ...


# -- httpx ------------------------------------------------------------------------------------------------
class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers: Mapping[str, str] = response.headers
        self.url = str(response.request.url)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as e:
            raise BackendTimeoutError(f"{self.url} stopped sending for longer than the timeout") from e
        except httpx.HTTPError as e:
            raise BackendUnavailableError(f"{self.url} broke off the response: {type(e).__name__}: {e}") from e

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxUpstream:
    """Upstream over httpx (see module docstring)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        timeout = httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        self._extensions = {"timeout": timeout.as_dict()}
        self._urls: dict[str, httpx.URL] = {}
        limits = httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits)

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> UpstreamResponse:
        parsed = self._urls.get(url)
        if parsed is None:  # a handful of distinct URLs: parse each once
            parsed = self._urls[url] = httpx.URL(url)
        request = httpx.Request(method, parsed, content=body, headers=dict(headers), extensions=self._extensions)
        return _HttpxResponse(await asend_with_retries(self._client, request, self.config.retry))

    async def aclose(self) -> None:
        await self._client.aclose()


# -- h11 ---------------------------------------------------------------------------------------------------
class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.num_exchanges = 0
        """Exchanges completed on this connection (0: fresh, so a failure is not a stale keep-alive)."""

    def close(self) -> None:
        self.writer.close()


class _StaleConnection(Exception):
    """A kept-alive connection the upstream had closed; the request is re-sent on a fresh one."""


class _H11Response:
    def __init__(self, pool: H11Upstream, conn: _Connection, response: h11.Response, url: str) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status_code = response.status_code
        self.headers: Mapping[str, str] = {k.decode().lower(): v.decode("latin-1") for k, v in response.headers}
        self.url = url

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        while self._conn is not None:
            try:
                event = await self._pool.next_event(self._conn)
            except TimeoutError as e:
                await self.aclose()
                raise BackendTimeoutError(f"{self.url} stopped sending for longer than the timeout") from e
            except (OSError, h11.ProtocolError) as e:
                await self.aclose()
                raise BackendUnavailableError(f"{self.url} broke off the response: {type(e).__name__}: {e}") from e
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                conn, self._conn = self._conn, None
                self._pool.release(conn, reusable=isinstance(event, h11.EndOfMessage))

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        if self._conn is not None:  # not read to the end: the connection cannot be reused
            conn, self._conn = self._conn, None
            self._pool.release(conn, reusable=False)


class H11Upstream:
    """Keep-alive HTTP/1.1 pool for a plain-http upstream (see module docstring)."""

    def __init__(self, config: ProxyConfig) -> None:
        parts = urllib.parse.urlsplit(config.upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"the h11 transport speaks plain http:// only, not {config.upstream_url!r}; use httpx")
        self.config = config
        self._host = parts.hostname
        self._port = parts.port or 80
        self._host_header = parts.netloc.encode()
        self._idle: list[_Connection] = []
        self._slots: asyncio.Semaphore | None = None  # made on first use, inside the serving loop

    async def send(self, method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> UpstreamResponse:
        target = urllib.parse.urlsplit(url)
        path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        attempt = 0
        while True:
            try:
                response = await self._send_once(method, path, url, body, headers)
            except TimeoutError as e:
                raise BackendTimeoutError(
                    f"{url} did not answer in time (timeout_s={self.config.timeout_s}); raise it if the "
                    f"upstream is just slow, or check its load"
                ) from e
            except (OSError, h11.ProtocolError) as e:
                delay = retry_delay(self.config.retry, attempt, None, None, url)
                if delay is None:
                    raise unavailable_error(url, e, attempt + 1) from e
                why = type(e).__name__
            else:
                delay = retry_delay(self.config.retry, attempt, response.status_code, response.headers.get("retry-after"), url)
                if delay is None:
                    return response
                await response.aclose()
                why = f"HTTP {response.status_code}"
            log_retry(url, why, attempt, self.config.retry, delay)
            await asyncio.sleep(delay)
            attempt += 1

    async def _send_once(
        self, method: str, path: str, url: str, body: bytes | None, headers: Mapping[str, str]
    ) -> _H11Response:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_connections)
        await self._slots.acquire()
        try:
            for reuse in (True, False):
                conn = await self._checkout(reuse)
                try:
                    event = await self._exchange(conn, method, path, body, headers)
                except _StaleConnection:
                    continue  # the upstream closed it while idle: send again on a new connection
                except BaseException:
                    conn.close()
                    raise
                return _H11Response(self, conn, event, url)
            raise ConnectionResetError(f"{url} closed a fresh connection before answering")
        except BaseException:
            self._slots.release()
            raise

    async def _checkout(self, reuse: bool) -> _Connection:
        while reuse and self._idle:
            conn = self._idle.pop()
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn
            conn.close()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self._host, self._port), self.config.connect_timeout_s
        )
        return _Connection(reader, writer)

    async def _exchange(
        self, conn: _Connection, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> h11.Response:
        fresh = conn.num_exchanges == 0
        fields = [(b"host", self._host_header), *((k.encode(), v.encode()) for k, v in headers.items())]
        fields.append((b"content-length", str(len(body or b"")).encode()))
        data = conn.h11.send(h11.Request(method=method, target=path.encode(), headers=fields)) or b""
        data += (conn.h11.send(h11.Data(data=body)) or b"") if body else b""
        data += conn.h11.send(h11.EndOfMessage()) or b""
        try:
            conn.writer.write(data)
            await conn.writer.drain()
            event = await self.next_event(conn)
            while isinstance(event, h11.InformationalResponse):  # 1xx (none expected: no Expect sent)
                event = await self.next_event(conn)
        except (ConnectionResetError, BrokenPipeError, h11.RemoteProtocolError) as e:
            if fresh:
                raise
            conn.close()
            raise _StaleConnection from e
        if isinstance(event, h11.ConnectionClosed):
            conn.close()
            if fresh:
                raise ConnectionResetError("the upstream closed the connection without answering")
            raise _StaleConnection
        assert isinstance(event, h11.Response), event  # h11 gives a Response first, or raises
        return event

    async def next_event(self, conn: _Connection) -> Any:
        """The next h11 event, reading from the socket as needed (read timeout per read)."""
        while True:
            event = conn.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(conn.reader.read(65536), self.config.timeout_s)
            conn.h11.receive_data(data)  # b"" marks the end of the stream

    def release(self, conn: _Connection, *, reusable: bool) -> None:
        """Back to the idle pool when the exchange ended cleanly and both sides keep the connection."""
        conn.num_exchanges += 1
        if reusable and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
        else:
            conn.close()
        assert self._slots is not None
        self._slots.release()

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def make_upstream(config: ProxyConfig) -> Upstream:
    """The transport `config.transport` names; "auto" takes h11 for http:// and httpx otherwise."""
    if config.transport == "httpx" or (config.transport == "auto" and not config.upstream_url.startswith("http://")):
        return HttpxUpstream(config)
    return H11Upstream(config)
