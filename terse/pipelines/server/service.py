"""What the HTTP layer asks of a mode (engine or proxy), and the per-request context it passes."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from terse.pipelines.server.hooks import PromptAccounting
from terse.pipelines.server.schema import ChatRequest, CompletionRequest


@dataclass
class RequestContext:
    """Per-request facts shared by the HTTP layer and the mode serving it."""

    request_id: str
    """The client's `x-request-id` when it sent a usable one, else a fresh id; echoed back."""
    http: Request
    """The HTTP request (to watch for the client going away)."""
    accounting: PromptAccounting | None = None
    """Prompt tokens before/after hooks (chat only)."""
    client_authorization: str | None = None
    """The client's Authorization header, for a proxy that forwards it upstream."""
    headers: dict[str, str] = field(default_factory=dict)
    """Headers to add to the response."""
    pending_accounting: asyncio.Future[PromptAccounting] | None = None
    """The accounting while it is still being counted, alongside the upstream call (a mode with
    `accounting_alongside`): `settle_accounting` waits for it before anything reads `accounting`."""

    count_added_tokens: Callable[[int], None] | None = None
    """Told the tokens `add_prompt_tokens` adds, after the accounting itself was recorded (the server's
    prompt-token counters, `ServerMetrics.add_prompt_tokens`)."""

    def add_prompt_tokens(self, num_tokens: int) -> None:
        """Add tokens a mode puts into the prompt beyond the counted messages (engine mode's tool prompt)
        to both sides of the accounting and to the server's counters: the saving is unchanged."""
        if self.accounting is None:
            return
        self.accounting = dataclasses.replace(
            self.accounting,
            original_prompt_tokens=self.accounting.original_prompt_tokens + num_tokens,
            sent_prompt_tokens=self.accounting.sent_prompt_tokens + num_tokens,
        )
        if self.count_added_tokens is not None:
            self.count_added_tokens(num_tokens)

    async def settle_accounting(self) -> None:
        """Wait for accounting counted alongside the upstream call, if any, and make it `accounting`."""
        if self.pending_accounting is not None:
            pending, self.pending_accounting = self.pending_accounting, None
            self.accounting = await pending

    def terse_usage(self) -> dict[str, int] | None:
        """The accounting fields added under `usage["terse"]`, when there is accounting."""
        return None if self.accounting is None else self.accounting.usage_fields()

    def response_headers(self) -> dict[str, str]:
        headers = {"x-request-id": self.request_id, **self.headers}
        if self.accounting is not None:
            headers.update(self.accounting.headers())
        return headers


class ChatService(Protocol):
    """A serving mode. Methods raise `ApiError` (or terse errors mapped by `api_error_from`)."""

    cheap_counting: bool
    """True when `count_prompt_tokens` is cheap enough to run on the event loop (no tokenizer involved)."""
    accounting_alongside: bool
    """True when the mode reads a chat request's accounting only once its answer comes back (it calls
    `RequestContext.settle_accounting` first): the prompt is then counted while the request is served."""

    def count_prompt_tokens(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> int:
        """Tokens of the prompt these messages and tool definitions make, as this mode's model reads them
        (a `PromptCounter`: wire-form messages, tool calls included; called from a worker thread)."""
        ...

    def check_request(self, request: ChatRequest | CompletionRequest) -> None:
        """Raise `ApiError` for a request this mode cannot honour (run before any hook)."""
        ...

    def engine_stats(self) -> Mapping[str, Any]:
        """The model engine's counters and gauges for /metrics (empty when there are none)."""
        ...

    async def health(self) -> tuple[int, dict[str, Any]]:
        """HTTP status and body of /health."""
        ...

    async def chat(self, request: ChatRequest, ctx: RequestContext) -> Response: ...

    async def completions(self, request: CompletionRequest, ctx: RequestContext) -> Response: ...

    async def models(self, ctx: RequestContext) -> Response: ...

    async def model(self, model_id: str, ctx: RequestContext) -> Response: ...

    async def embeddings(self, body: dict[str, Any], ctx: RequestContext) -> Response: ...

    async def passthrough(self, path: str, body: bytes, ctx: RequestContext) -> Response:
        """Any other /v1 `path` (method, query and headers in `ctx.http`; `body` as received)."""
        ...

    async def tokenize(self, body: dict[str, Any], ctx: RequestContext) -> Response: ...

    async def detokenize(self, body: dict[str, Any], ctx: RequestContext) -> Response: ...

    async def aclose(self) -> None: ...


async def wait_for_disconnect(http: Request) -> None:
    """Return when the client closes its connection (the request body must already be read)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGoneError(Exception):
    """The client disconnected before its answer was ready."""


async def race_disconnect(work: asyncio.Future[Any], http: Request) -> Any:
    """Await `work`; if the client disconnects first, cancel `work` and raise `ClientGoneError`."""
    watcher = asyncio.ensure_future(wait_for_disconnect(http))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    raise ClientGoneError
