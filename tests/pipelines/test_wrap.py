"""`wrap_openai`: the real `openai` client (sync and async) against `terse serve`, with hooks in between."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from terse.backend import load_backend
from terse.errors import InvalidRequestError
from terse.pipelines.server import ServerThread
from terse.pipelines.server.hooks import ChatResult
from terse.pipelines.server.schema import ChatRequest
from terse.pipelines.wrap import last_accounting, wrap_openai
from tests.pipelines.test_server import MESSAGES, MODEL, start_engine_server


class KeepLast:
    """Drops all but the last message; shouts whole answers."""

    name = "keep-last"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_request(self, request: ChatRequest) -> ChatRequest:
        self.seen.append(len(request.messages))
        return request.with_messages(request.messages[-1:])

    def on_response(self, request: ChatRequest, result: ChatResult) -> ChatResult:
        return ChatResult(tuple(t.upper() for t in result.texts))


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerThread]:
    server = start_engine_server(load_backend(f"hf:{tiny_llama}"))
    yield server
    server.stop()


def test_sync_client_passes_through_hooks(server: ServerThread) -> None:
    plain = openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0)
    hook = KeepLast()
    wrapped = wrap_openai(plain, hook)
    args = {"model": MODEL, "max_tokens": 8, "temperature": 0}
    got = wrapped.chat.completions.create(messages=MESSAGES, **args)
    want = plain.chat.completions.create(messages=MESSAGES[-1:], **args)
    assert hook.seen == [2]
    assert got.choices[0].message.content == (want.choices[0].message.content or "").upper()
    accounting = last_accounting(got)
    assert accounting is not None and accounting.saved_prompt_tokens > 0
    assert wrapped.models.list().data[0].id == MODEL  # everything else is the client's own
    streamed = wrapped.chat.completions.create(messages=MESSAGES, stream=True, **args)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == want.choices[0].message.content  # rewritten request; streamed text is not post-processed
    with pytest.raises(InvalidRequestError, match="messages"):
        wrapped.chat.completions.create(messages=[], **args)


def test_async_client_passes_through_hooks(server: ServerThread) -> None:
    async def main() -> tuple[str | None, str | None]:
        plain = openai.AsyncOpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0)
        wrapped = wrap_openai(plain, KeepLast())
        args = {"model": MODEL, "max_tokens": 6, "temperature": 0}
        got = await wrapped.chat.completions.create(messages=MESSAGES, **args)
        want = await plain.chat.completions.create(messages=MESSAGES[-1:], **args)
        await plain.close()
        return got.choices[0].message.content, want.choices[0].message.content

    got, want = asyncio.run(main())
    assert got == (want or "").upper()
