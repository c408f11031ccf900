"""The Backend contract's pieces: SamplingParams validation, RequestHandle, sampling, TextStream, registry."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from terse.backend import (
    Completion,
    RequestHandle,
    SamplingParams,
    StreamingKV,
    TokenScores,
    Usage,
    load_backend,
)
from terse.backend.registry import parse_spec
from terse.backend.sampling import make_generator, sample_next
from terse.backend.textstream import TextStream
from terse.backend.tokenization import load_tokenizer
from terse.errors import ConfigError, InvalidRequestError


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_tokens": -1}, "max_tokens=-1"),
        ({"temperature": -0.5}, "temperature=-0.5"),
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"top_p": 0.0}, "top_p=0.0"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"stop": "\n"}, "tuple of strings"),
        ({"stop": ("",)}, "non-empty"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_streaming_kv_and_usage_and_token_scores() -> None:
    with pytest.raises(InvalidRequestError, match="window_tokens=0"):
        StreamingKV(window_tokens=0)
    assert Usage(3, 1, 2) + Usage(1, 0, 1) == Usage(4, 1, 3)
    assert Usage(3, 1, 2).total_tokens == 5
    with pytest.raises(ValueError, match="lengths differ"):
        TokenScores((1, 2), (0.0,), ((0, 1), (1, 2)))


def _completion(text: str) -> Completion:
    return Completion(text, (1,), "stop", Usage(1, 0, 1))


def test_handle_streams_replays_and_awaits() -> None:
    cancelled: list[bool] = []
    handle = RequestHandle("r1", on_cancel=lambda: cancelled.append(True))
    seen: list[str] = []
    consumer = threading.Thread(target=lambda: seen.extend(handle))
    consumer.start()
    for piece in ["Hel", "", "lo", " world"]:
        handle.emit(piece)
    handle.finish(_completion("Hello world"))
    consumer.join(timeout=5)
    assert seen == ["Hel", "lo", " world"]
    assert list(handle) == seen  # a second iterator replays from the start
    assert handle.result().text == "Hello world"
    handle.cancel()
    assert cancelled == []  # cancelling a finished request does nothing

    async def consume() -> tuple[list[str], Completion]:
        h = RequestHandle("r2")
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, h.emit, "a")
        loop.call_later(0.02, h.emit, "b")
        loop.call_later(0.03, h.finish, _completion("ab"))
        parts = [d async for d in h.astream()]
        return parts, await h

    parts, result = asyncio.run(consume())
    assert parts == ["a", "b"] and result.text == "ab"


def test_cancelling_an_awaiting_task_cancels_the_request() -> None:
    cancelled: list[str] = []

    async def scenario() -> RequestHandle:
        handle = RequestHandle("r4", on_cancel=lambda: cancelled.append("r4"))
        task = asyncio.ensure_future(handle._wait_async())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return handle

    handle = asyncio.run(scenario())
    assert cancelled == ["r4"] and not handle.done()
    handle.finish(_completion("late"))  # the backend can still settle the request normally
    assert handle.result().text == "late"


def test_handle_failure_and_timeout() -> None:
    handle = RequestHandle("r3")
    with pytest.raises(TimeoutError, match="r3"):
        handle.result(timeout=0.01)
    handle.cancel()
    assert handle.cancel_requested
    handle.fail(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        handle.result()
    with pytest.raises(RuntimeError, match="boom"):
        list(handle)


def test_sample_next_greedy_top_p_and_seeds() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 10.0]])
    greedy = SamplingParams()
    assert sample_next(logits, [greedy] * 3, [None] * 3).tolist() == [1, 0, 2]
    tight = SamplingParams(temperature=1.0, top_p=0.01)  # nucleus of one token = greedy
    assert sample_next(logits, [tight] * 3, [None] * 3).tolist() == [1, 0, 2]
    hot = SamplingParams(temperature=5.0, seed=3)
    flat = torch.zeros(1, 50)
    draws = [
        sample_next(flat, [hot], [make_generator(3, torch.device("cpu"))]).item() for _ in range(3)
    ]
    assert len(set(draws)) == 1  # same seed, same sample
    gen = make_generator(3, torch.device("cpu"))
    many = {int(sample_next(flat, [hot], [gen]).item()) for _ in range(40)}
    assert len(many) > 10  # the generator advances: samples spread over the vocabulary


def test_text_stream_holds_back_stop_prefixes(tiny_llama: Path) -> None:
    tok = load_tokenizer(tiny_llama)
    text = "Alice works at Acme Corp in Paris; Bob founded Globex."
    ids = tok(text, add_special_tokens=False).input_ids
    stream = TextStream(tok, stop=("Bob",))
    deltas = []
    stopped = False
    for t in ids:
        d, stopped = stream.push(t)
        deltas.append(d)
        if stopped:
            break
    assert stopped
    assert "".join(deltas) == stream.text == "Alice works at Acme Corp in Paris; "
    plain = TextStream(tok)
    out = "".join(plain.push(t)[0] for t in tok("東京は日本の首都です。", add_special_tokens=False).input_ids)
    assert out + plain.flush() == "東京は日本の首都です。"


def test_registry_specs() -> None:
    assert parse_spec("openai:http://127.0.0.1:8000/v1#m") == ("openai", "http://127.0.0.1:8000/v1#m")
    for bad in ["nonsense", "ftp:x", "local:"]:
        with pytest.raises(ConfigError, match="known schemes"):
            load_backend(bad)
