"""The program DSL on a tiny random Llama through the HF backend: state text, gen, select, fork/join,
batching, streaming, async and errors, each checked against direct backend calls."""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import terse
from terse.backend.base import Backend
from terse.backend.handle import RequestHandle
from terse.backend.local.engine import LocalEngine
from terse.backend.types import Message, SamplingParams, TokenScores
from terse.errors import InvalidRequestError, UnsupportedOperationError
from terse.pipelines.program import (
    ProgramError,
    ProgramState,
    VariableError,
    assistant,
    fork,
    gen,
    program,
    select,
    system,
    user,
)
from tests.conftest import backend_over_http

P = SamplingParams(max_tokens=5)
SYS: Message = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module", params=["hf", "local", "openai"])
def backend(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[Backend]:
    """Every test runs on plain transformers, on terse's engine, and over HTTP: the OpenAI-compatible
    backend talking to a real `terse serve` in front of the engine (same tiny weights throughout)."""
    if request.param != "openai":
        b = terse.load_backend(f"{request.param}:{tiny_llama}")
        yield b
        b.close()
        return
    with backend_over_http(tiny_llama) as remote:
        yield remote


def _gen(backend: Backend, prompt: str, params: SamplingParams = P) -> str:
    return backend.generate([prompt], params)[0].text


def test_public_names_are_lazy_top_level_exports() -> None:
    assert terse.program is program and terse.gen is gen and terse.fork is fork


def test_state_text_after_each_step(backend: Backend) -> None:
    seen: list[str] = []

    @program
    def qa(s: ProgramState, question: str) -> None:
        s += system("Be brief.")
        seen.append(s.text)
        s += user(question)
        seen.append(s.text)
        s += assistant(gen("answer", P))
        seen.append(s.text)

    out = qa.run("Where does Alice work?", backend=backend)
    u: Message = {"role": "user", "content": "Where does Alice work?"}
    answer = _gen(backend, backend.render_chat([SYS, u]))
    assert out["answer"] == answer
    assert seen == [
        backend.render_chat([SYS]),
        backend.render_chat([SYS, u]),
        backend.render_chat([SYS, u, {"role": "assistant", "content": answer}]),
    ]
    assert out.messages == [SYS, u, {"role": "assistant", "content": answer}]
    assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens == backend.count_tokens(seen[1]) + 1
    assert 0 < out.critical_path_s <= out.wall_s


def test_raw_text_and_assistant_prefill_are_continued(backend: Backend) -> None:
    @program
    def story(s: ProgramState) -> None:
        s += "Once upon a time"
        s += gen("next", P, stop=("\n\n",))

    out = story.run(backend=backend)
    assert out["next"] == _gen(backend, "Once upon a time", SamplingParams(max_tokens=5, stop=("\n\n",)))
    assert out.text == "Once upon a time" + out["next"]

    @program
    def prefilled(s: ProgramState) -> None:
        s += user("Name a fox.")
        s += "Sure: "
        s += gen("name", P)
        s += user("Another?")

    out = prefilled.run(backend=backend)
    u: Message = {"role": "user", "content": "Name a fox."}
    name = _gen(backend, backend.render_chat([u]) + "Sure: ")
    assert out["name"] == name
    assert out.messages == [u, {"role": "assistant", "content": "Sure: " + name}, {"role": "user", "content": "Another?"}]


def test_select_picks_the_highest_total_logprob(backend: Backend) -> None:
    choices = ["yes", "no", "maybe later"]

    @program
    def judge(s: ProgramState) -> None:
        s += system("Be brief.")
        s += user("Is the fox quick?")
        s += assistant(select("verdict", choices), ".")

    out = judge.run(backend=backend)
    prefix = backend.render_chat([SYS, {"role": "user", "content": "Is the fox quick?"}])
    totals = [t.total_logprob for t in backend.score(choices, prefix=prefix)]
    assert out.choice_logprobs("verdict") == pytest.approx(totals)
    assert out["verdict"] == choices[totals.index(max(totals))]
    assert out.messages[-1] == {"role": "assistant", "content": out["verdict"] + "."}


class _NoLogprobs:
    """A backend that cannot score, as an OpenAI-compatible server without logprobs."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.model_name = "no-logprobs"

    def score(self, texts: Sequence[str], *, prefix: str = "") -> list[TokenScores]:
        raise UnsupportedOperationError("this server returns no logprobs")

    def render_chat(self, messages: Sequence[Message]) -> str:
        return self.inner.render_chat(messages)


def test_select_without_logprobs_says_it_needs_them(backend: Backend) -> None:
    @program
    def judge(s: ProgramState) -> str:
        s += user("Is the fox quick?")
        s += assistant(select("verdict", ["yes", "no"]))
        return s["verdict"]

    with pytest.raises(UnsupportedOperationError, match="select\\('verdict'\\) needs per-token log-prob") as info:
        judge.run(backend=_NoLogprobs(backend))  # type: ignore[arg-type]
    assert any("judge" in note and "select" in note for note in info.value.__notes__)


def test_fork_branches_share_the_prefix_and_join(backend: Backend) -> None:
    request = "Give ideas for a paged KV cache that stores keys and values in fixed-size blocks. " * 4

    @program
    def ideas(s: ProgramState) -> list[str]:
        s += user(request)
        s += "Idea:"
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f" {i + 1}."
            f += gen("idea", P)
        forks.join()
        return forks.values("idea")

    out = ideas.run(backend=backend)
    base = backend.render_chat([{"role": "user", "content": request}]) + "Idea:"
    expected = [_gen(backend, base + f" {i + 1}.") for i in range(3)]
    assert out.return_value == expected
    assert out.text == base  # the parent is unchanged by its branches
    assert out.usage.completion_tokens == 15
    if isinstance(backend, LocalEngine):  # the branches' shared prefix was prefilled once
        assert out.usage.cached_prompt_tokens >= 2 * (backend.count_tokens(base) // 2)
    with pytest.raises(VariableError, match=r"forks\[0\]\['idea'\]"):
        out["idea"]


def test_run_batch_equals_sequential_runs(backend: Backend) -> None:
    @program
    def qa(s: ProgramState, question: str, n: int = 4) -> None:
        s += user(question)
        s += assistant(gen("answer", SamplingParams(max_tokens=n)))

    questions = ["Where does Alice work?", "Who founded Globex?", "What is a paged cache?", "Why?"]
    batch = qa.run_batch([{"question": q} for q in questions[:2]] + [(q, 6) for q in questions[2:]],
                         backend=backend, progress=True)
    single = [qa.run(q, backend=backend) for q in questions[:2]] + [qa.run(q, 6, backend=backend) for q in questions[2:]]
    assert [o["answer"] for o in batch] == [o["answer"] for o in single]
    assert qa.run_batch([], backend=backend) == []
    with pytest.raises(ProgramError, match="mapping of keyword arguments or a sequence"):
        qa.run_batch(["Why?"], backend=backend)


def test_stream_a_variable_and_await_a_run(backend: Backend) -> None:
    @program
    def qa(s: ProgramState, question: str) -> None:
        s += user(question)
        s += assistant(gen("answer", SamplingParams(max_tokens=8)))

    run = qa.submit("Where does Alice work?", backend=backend)
    deltas = list(run.stream("answer"))
    assert "".join(deltas) == run.result()["answer"]
    with pytest.raises(VariableError, match="did not generate 'missing'"):
        list(run.stream("missing"))
    awaited = asyncio.run(qa.arun("Where does Alice work?", backend=backend))
    assert awaited["answer"] == run.result()["answer"]

    async def stream_async() -> list[str]:
        started = qa.submit("Where does Alice work?", backend=backend)
        deltas = [d async for d in started.astream("answer")]
        assert "".join(deltas) == (await started)["answer"]
        return deltas

    assert "".join(asyncio.run(stream_async())) == awaited["answer"]


def test_programs_compose(backend: Backend) -> None:
    @program
    def ask(s: ProgramState, question: str) -> None:
        s += user(question)
        s += assistant(gen("answer", P))

    @program
    def twice(s: ProgramState) -> str:
        ask(s, "First?")
        ask(s, "Second?")
        return s["answer"]

    out = twice.run(backend=backend)
    assert len(out.messages) == 4 and out.return_value == out.messages[-1]["content"]
    with pytest.raises(ProgramError, match="call ask.run"):
        ask("First?")  # type: ignore[arg-type]


def test_errors_raised_in_the_program_keep_its_traceback(backend: Backend) -> None:
    @program
    def broken(s: ProgramState) -> None:
        s += user("Hi")
        s += assistant(gen("answer", P))
        raise ValueError(f"bad answer {s['answer']!r}")

    with pytest.raises(ValueError, match="bad answer") as info:
        broken.run(backend=backend)
    assert "broken" in [frame.name for frame in traceback.extract_tb(info.tb)]


def test_backend_errors_name_the_program_line(backend: Backend) -> None:
    @program
    def empty_prompt(s: ProgramState) -> None:
        s += gen("x", P)  # nothing to continue

    with pytest.raises(InvalidRequestError, match="prompt is empty") as info:
        empty_prompt.run(backend=backend)
    assert any("gen('x')" in n and 's += gen("x", P)' in n for n in info.value.__notes__)

    @program
    def raw_then_chat(s: ProgramState) -> None:
        s += "raw"
        s += user("Hi")

    with pytest.raises(ProgramError, match="comes before the first chat message"):
        raw_then_chat.run(backend=backend)


def test_mistakes_raise_at_the_line_that_wrote_them() -> None:
    with pytest.raises(ProgramError, match="put it in assistant"):
        user(gen("x"))  # type: ignore[arg-type]
    with pytest.raises(ProgramError, match="at least one non-empty string"):
        select("x", [])
    with pytest.raises(ProgramError, match="at least one non-empty string"):
        select("x", "yes")  # a string is not a list of choices
    with pytest.raises(ProgramError, match="must be a terse.SamplingParams"):
        gen("x", {"max_tokens": 3})  # type: ignore[arg-type]


class _Barrier:
    """Lets a submit through only once `parties` submits are waiting: proves they were issued together
    (a program that waited for one result before submitting the next would break the barrier)."""

    def __init__(self, inner: Backend, parties: int) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.barrier = threading.Barrier(parties, timeout=20)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestHandle:
        self.barrier.wait()
        return self.inner.submit(prompt, params)

    def render_chat(self, messages: Sequence[Message]) -> str:
        return self.inner.render_chat(messages)


def test_forks_and_batch_items_are_in_flight_together(backend: Backend) -> None:
    @program
    def branches(s: ProgramState) -> list[str]:
        s += user("Give ideas.")
        forks = s.fork(3)
        for f in forks:
            f += gen("idea", P)
        return forks.values("idea")

    out = branches.run(backend=_Barrier(backend, 3))  # type: ignore[arg-type]
    assert len(out.return_value) == 3

    @program
    def qa(s: ProgramState, question: str) -> None:
        s += user(question)
        s += assistant(gen("answer", P))

    outs = qa.run_batch([("A?",), ("B?",), ("C?",), ("D?",)], backend=_Barrier(backend, 4))  # type: ignore[arg-type]
    assert [o["answer"] for o in outs] == [qa.run(f"{q}?", backend=backend)["answer"] for q in "ABCD"]
