"""`with_terse_usage`: the usage event of a proxied stream gains `usage.terse`; every other byte passes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from terse.pipelines.server.sse_usage import add_terse_usage, with_terse_usage

FIELDS = {"saved_prompt_tokens": 7, "token_count": "estimate"}


def test_only_usage_events_change() -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n'
    assert json.loads(add_terse_usage(usage, FIELDS)[6:])["usage"] == {"prompt_tokens": 3, "terse": FIELDS}
    assert add_terse_usage(usage, FIELDS).endswith(b"\n\n")
    crlf = b'event: x\r\ndata: {"usage":{"prompt_tokens":3}}\r\n\r\n'
    assert add_terse_usage(crlf, FIELDS).startswith(b"event: x\ndata: {") and add_terse_usage(crlf, FIELDS).endswith(b"\r\n\r\n")
    for event in (
        b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":null}\n\n',  # usage null: not the usage chunk
        b"data: [DONE]\n\n",
        b'data: {"error":{"message":"usage limit"}}\n\n',
        b": keep-alive usage\n\n",
        b'data: {"usage": \n\n',  # not JSON
    ):
        assert add_terse_usage(event, FIELDS) == event


def test_events_cut_anywhere_are_reassembled_and_nothing_is_held_back() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"A"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n'
        b"data: [DONE]\n\n"
    )

    async def chunks(size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(stream), size):
            yield stream[i : i + size]
        yield b"data: tail-without-end"

    async def collect(size: int) -> bytes:
        return b"".join([c async for c in with_terse_usage(chunks(size), FIELDS)])

    expected = stream.replace(b'{"prompt_tokens":3}', b'{"prompt_tokens":3,"terse":' + json.dumps(FIELDS, separators=(",", ":")).encode() + b"}")
    for size in (1, 7, 1000):
        assert asyncio.run(collect(size)) == expected + b"data: tail-without-end"
