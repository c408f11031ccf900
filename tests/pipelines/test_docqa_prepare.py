"""Preparing a batch on several threads or worker processes gives the prompts of one-at-a-time preparation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from terse.backend.local.engine import LocalEngine
from terse.backend.registry import load_backend
from terse.errors import ConfigError, InvalidRequestError
from terse.pipelines.docqa import DocQAConfig, DocQAJob, JobPaths
from terse.pipelines.docqa.answerer import BatchAnswerer
from terse.pipelines.docqa.inputs import load_corpus, read_questions
from terse.pipelines.docqa.prepare import PreparedQuestion
from terse.pipelines.docqa.prepare_pool import PreparePool, auto_processes
from terse.pipelines.docqa.sample import write_synthetic


def test_concurrent_preparation_matches_sequential(tiny_llama: Path, tmp_path: Path) -> None:
    docs, questions_path = write_synthetic(tmp_path / "data", questions_per_kind=2, context_tokens=256)
    corpus = load_corpus([docs])
    questions = read_questions(questions_path)
    # one question names a document that is not in the corpus: it fails alone, in its place
    broken = dataclasses.replace(questions[1], doc_ids=("no-such-document",))
    batch = [questions[0], broken, *questions[2:]]
    # the token pruner makes compression call the engine: those calls come from several threads at once
    config = DocQAConfig(backend=f"local:{tiny_llama}").with_overrides(
        compression={"budget": {"target_tokens": 120}, "compressor": {"token_pruner": "parallel"}}, retrieval={"enabled": False})
    with LocalEngine.from_spec(str(tiny_llama), num_kv_blocks=512, kv_block_size=16) as engine:
        preparer = BatchAnswerer(config, engine, corpus).preparer
        assert preparer.compressor is not None and preparer.compressor.scorer is engine
        one_by_one = preparer.prepare_all(batch, workers=1)
        together = preparer.prepare_all(batch, workers=4)
    assert isinstance(together[1], Exception) and isinstance(one_by_one[1], Exception)
    assert str(together[1]) == str(one_by_one[1])
    others = [(a, b) for i, (a, b) in enumerate(zip(one_by_one, together)) if i != 1]
    assert len(others) == len(batch) - 1
    for a, b in others:
        assert isinstance(a, PreparedQuestion) and isinstance(b, PreparedQuestion)
        assert (b.record.id, b.prompt, b.sources) == (a.record.id, a.prompt, a.sources)
        assert a.original_prompt_tokens > 120


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_worker_processes_prepare_what_this_process_prepares(tiny_llama: Path, tmp_path: Path,
                                                             start_method: str) -> None:
    docs, questions_path = write_synthetic(tmp_path / "data", questions_per_kind=2, context_tokens=256)
    corpus = load_corpus([docs])
    questions = read_questions(questions_path)
    # a question whose documents cannot be found, and one whose compression fails in the worker
    missing = dataclasses.replace(questions[1], doc_ids=("no-such-document",))
    config = DocQAConfig(backend=f"hf:{tiny_llama}").with_overrides(
        compression={"budget": {"target_tokens": 60}}, retrieval={"enabled": False})
    backend = load_backend(f"hf:{tiny_llama}", device="cpu")
    preparer = BatchAnswerer(config, backend, corpus).preparer
    too_long = dataclasses.replace(questions[2], question="why? " * 200)  # the question alone is over budget
    batch = [questions[0], missing, too_long, *questions[3:]]
    here = preparer.prepare_all(batch)
    with PreparePool.for_compressor(preparer.compressor, 2, start_method) as pool:  # type: ignore[union-attr]
        assert pool is not None and pool.alive
        there = preparer.prepare_all(batch, pool=pool)
    assert not pool.alive
    assert [type(x) for x in there] == [type(x) for x in here]
    assert isinstance(there[1], Exception) and isinstance(there[2], InvalidRequestError)
    for a, b in zip(here, there):
        if isinstance(a, PreparedQuestion):
            assert isinstance(b, PreparedQuestion)
            assert (a.prompt, a.sources, a.original_prompt_tokens) == (b.prompt, b.sources, b.original_prompt_tokens)
    backend.close()


def test_a_job_prepares_ahead_on_processes_with_the_same_answers(tiny_llama: Path, tmp_path: Path) -> None:
    docs, questions = write_synthetic(tmp_path / "data", questions_per_kind=2, context_tokens=256)
    outputs = {}
    for processes in (0, 2):
        config = DocQAConfig(backend=f"hf:{tiny_llama}").with_overrides(
            generation={"max_tokens": 4}, compression={"budget": {"target_tokens": 80}}, retrieval={"enabled": False},
            run={"progress": False, "batch_size": 2, "prepare_processes": processes})
        job = DocQAJob(config, JobPaths(questions, (docs,), tmp_path / f"answers-{processes}.jsonl"))
        summary = job.run()
        assert summary.num_failed == 0
        assert set(job.stage_seconds) == {"prepare", "generate", "prepare_overlapped"}
        # several batches: prepared ahead on processes, or in process with batches submitted ahead
        assert job.stage_seconds["prepare_overlapped"] > 0
        lines = (tmp_path / f"answers-{processes}.jsonl").read_text().splitlines()
        outputs[processes] = sorted((r["id"], r["answer"], r["usage"]["prompt_tokens"])
                                    for r in map(json.loads, lines))
    assert outputs[0] == outputs[2]


def test_prepare_processes_is_validated() -> None:
    with pytest.raises(ConfigError, match="prepare_processes"):
        DocQAConfig().with_overrides(run={"prepare_processes": -1})
    assert auto_processes(3) == 3 and auto_processes(3, num_questions=10) == 3
    assert auto_processes("auto", num_questions=56) == 0  # a small job prepares in process
    assert auto_processes("auto") >= 0


class _RecordingAnswerer:
    """Stands in for `BatchAnswerer` to record the order of prepare / start / finish / cancel calls."""

    submits_ahead = True

    def __init__(self) -> None:
        self.log: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    def prepare(self, batch: list[int]) -> list[int]:
        self.log.append(("prepare", batch[0]))
        return list(batch)

    def start(self, batch: list[int], items: list[int]) -> list[int]:
        self.log.append(("start", batch[0]))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return items

    def finish(self, pending: list[int]) -> list[int]:
        self.log.append(("finish", pending[0]))
        self.in_flight -= 1
        return [x * 10 for x in pending]

    def cancel(self, pending: list[int]) -> None:
        self.log.append(("cancel", pending[0]))
        self.in_flight -= 1


def test_submit_ahead_keeps_the_next_batch_generating_and_yields_in_order() -> None:
    from terse.pipelines.docqa.job import submit_ahead

    answerer = _RecordingAnswerer()
    seconds = {"prepare": 0.0, "generate": 0.0, "prepare_overlapped": 0.0}
    batches = [[1, 2], [3, 4], [5]]
    out = list(submit_ahead(answerer, batches, seconds))  # type: ignore[arg-type]
    assert out == [[10, 20], [30, 40], [50]]
    assert answerer.log == [("prepare", 1), ("start", 1), ("prepare", 3), ("start", 3), ("finish", 1),
                            ("prepare", 5), ("start", 5), ("finish", 3), ("finish", 5)]
    assert answerer.most_in_flight == 2 and answerer.in_flight == 0


def test_submit_ahead_cancels_the_batch_nobody_collects() -> None:
    from terse.pipelines.docqa.job import submit_ahead

    answerer = _RecordingAnswerer()
    seconds = {"prepare": 0.0, "generate": 0.0, "prepare_overlapped": 0.0}
    answers = submit_ahead(answerer, [[1], [2], [3]], seconds)  # type: ignore[arg-type]
    assert next(answers) == [10]
    answers.close()  # the job stops after its first batch
    assert answerer.log[-1] == ("cancel", 2) and answerer.in_flight == 0
