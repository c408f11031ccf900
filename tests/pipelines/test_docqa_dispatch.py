"""doc-QA dispatch over a fake backend: per-question failures, the async dispatch's concurrency bound."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from terse.backend.handle import RequestHandle
from terse.backend.types import Completion, SamplingParams, Usage
from terse.errors import BackendUnavailableError, InvalidRequestError
from terse.pipelines.docqa.config import OrganizeConfig, RunConfig
from terse.pipelines.docqa.dispatch import AsyncDispatch, BatchDispatch, Generated, build_dispatch
from terse.pipelines.docqa.prepare import PreparedQuestion
from terse.pipelines.docqa.records import FailureRecord, QuestionRecord


class FakeBackend:
    """Answers "echo:<prompt>" after `delay_s` on a thread; "bad" prompts are rejected at submit,
    "down" prompts fail as unreachable. Records the most requests ever in flight."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestHandle:
        assert isinstance(prompt, str)
        if prompt == "bad":
            raise InvalidRequestError("prompt 'bad' is rejected")
        handle = RequestHandle(prompt)
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def finish() -> None:
            time.sleep(self.delay_s)
            with self.lock:
                self.in_flight -= 1
            if prompt == "down":
                handle.fail(BackendUnavailableError("connection refused"))
            else:
                handle.finish(Completion(f" echo:{prompt} ", (1,), "stop", Usage(len(prompt), 1, 1)))

        threading.Thread(target=finish, daemon=True).start()
        return handle


def prepared(prompt: str) -> PreparedQuestion:
    return PreparedQuestion(QuestionRecord(prompt, "q?"), (), (), prompt, (), 10, ())


def test_batch_dispatch_keeps_order_and_isolates_failures() -> None:
    outcomes = BatchDispatch(FakeBackend(), SamplingParams()).run([prepared(p) for p in ("a", "bad", "down", "b")])
    assert [type(o) for o in outcomes] == [Generated, FailureRecord, FailureRecord, Generated]
    a, bad, down, b = outcomes
    assert isinstance(a, Generated) and a.text == "echo:a" and a.usage == Usage(1, 1, 1)
    assert isinstance(bad, FailureRecord) and bad.error_type == "InvalidRequestError"
    assert not bad.backend_unavailable
    assert isinstance(down, FailureRecord) and down.backend_unavailable


def test_async_dispatch_bounds_concurrency_and_keeps_order() -> None:
    backend = FakeBackend(delay_s=0.03)
    dispatch = AsyncDispatch(backend, SamplingParams(), RunConfig(concurrency=3, requests_per_s=500.0))
    prompts = [f"p{i}" for i in range(12)]
    outcomes = dispatch.run([prepared(p) for p in prompts])
    assert [o.text for o in outcomes if isinstance(o, Generated)] == [f"echo:{p}" for p in prompts]
    assert 1 <= backend.max_in_flight <= 3


def test_dispatch_choice_follows_the_backend_spec() -> None:
    backend = FakeBackend()
    params = SamplingParams()
    off = OrganizeConfig()
    assert isinstance(build_dispatch(backend, "openai:http://h/v1#m", params, RunConfig(), off), AsyncDispatch)  # type: ignore[arg-type]
    assert isinstance(build_dispatch(backend, "hf:m", params, RunConfig(), off), BatchDispatch)  # type: ignore[arg-type]
    forced = build_dispatch(backend, "hf:m", params, RunConfig(dispatch="async"), off)  # type: ignore[arg-type]
    assert isinstance(forced, AsyncDispatch)
