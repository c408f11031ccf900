"""`RequestHandle`: the one handle every backend returns from `submit()`.

Consumers wait (`result()`), iterate text deltas (`for delta in handle`), await (`await handle`,
`async for delta in handle.astream()`), or `cancel()`. Producers (backend loops) call `emit()` for
each new piece of text and `finish()` or `fail()` exactly once. All methods are thread-safe.
A request that asked for log-probabilities (`SamplingParams.logprobs`) also gets its tokens' entries
through `emit()`; `logprobs_since(i)` reads them while it streams (each is recorded before the delta
it produced is delivered).

Deltas are kept, so any number of iterators can replay the stream from its start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import Any

from terse.backend.types import Completion, TokenLogprob

_END = object()


class RequestHandle:
    """Handle to one submitted request.

    `cancel()` asks the backend to stop; the request then finishes with `finish_reason == "abort"`
    and whatever text was produced so far (cancelling a finished request does nothing).
    """

    def __init__(self, request_id: str, on_cancel: Callable[[], None] | None = None) -> None:
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._deltas: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._future: concurrent.futures.Future[Completion] = concurrent.futures.Future()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = []
        self._cancel_requested = False

    # -- consumer side ---------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request finishes; re-raise its error if it failed.

        Raises `TimeoutError` when `timeout` seconds pass first (the request keeps running).
        """
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError as e:
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s") from e

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """Ask the backend to stop this request and free its resources. Idempotent."""
        with self._cond:
            if self._cancel_requested or self._future.done():
                return
            self._cancel_requested = True
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def __iter__(self) -> Iterator[str]:
        """Yield text deltas as they are produced, from the start; raise the request's error if any."""
        i = 0
        while True:
            with self._cond:
                while i >= len(self._deltas) and not self._future.done():
                    self._cond.wait()
                new = self._deltas[i:]
                finished = self._future.done()
            yield from new
            i += len(new)
            if finished and i >= len(self._deltas):
                self._future.result()  # re-raise the failure, if any
                return

    def __await__(self) -> Generator[Any, None, Completion]:
        return self._wait_async().__await__()

    async def _wait_async(self) -> Completion:
        """Await the result. Cancelling the awaiting task cancels the request (never the shared future)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not waiter.done():
                waiter.set_result(None)

        def wake(_: object) -> None:
            loop.call_soon_threadsafe(settle)

        self._future.add_done_callback(wake)
        try:
            await waiter
        except asyncio.CancelledError:
            self.cancel()
            raise
        return self._future.result()

    async def astream(self) -> AsyncIterator[str]:
        """Async iteration over text deltas (from the start)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        with self._cond:
            for d in self._deltas:
                queue.put_nowait(d)
            if self._future.done():
                queue.put_nowait(_END)
            else:
                self._listeners.append((loop, queue))
        while True:
            item = await queue.get()
            if item is _END:
                self._future.result()
                return
            yield item

    def logprobs_since(self, start: int) -> list[TokenLogprob]:
        """Log-probability entries recorded so far, from index `start` on (empty unless requested)."""
        with self._cond:
            return self._logprobs[start:]

    # -- producer side ---------------------------------------------------------------------------
    def emit(self, delta: str, logprobs: Sequence[TokenLogprob] = ()) -> None:
        """Append a text delta and the log-probabilities of the tokens behind it (backends only).
        An empty delta is not delivered to iterators; its log-probabilities are still recorded."""
        if logprobs:
            with self._cond:
                self._logprobs.extend(logprobs)
        if not delta:
            return
        with self._cond:
            self._deltas.append(delta)
            listeners = list(self._listeners)
            self._cond.notify_all()
        for loop, queue in listeners:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

    def finish(self, completion: Completion) -> None:
        """Complete the request (backends only). Later calls are ignored."""
        self._settle(lambda: self._future.set_result(completion))

    def fail(self, error: BaseException) -> None:
        """Fail the request with `error` (backends only); `result()` re-raises it."""
        self._settle(lambda: self._future.set_exception(error))

    def _settle(self, action: Callable[[], None]) -> None:
        with self._cond:
            if self._future.done():
                return
            action()
            listeners, self._listeners = self._listeners, []
            self._cond.notify_all()
        for loop, queue in listeners:
            loop.call_soon_threadsafe(queue.put_nowait, _END)
