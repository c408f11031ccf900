"""doc-QA job end to end on a tiny random model: answers, accuracy, usage, resume, failures, kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from terse.backend.handle import RequestHandle
from terse.backend.registry import load_backend
from terse.backend.types import SamplingParams
from terse.errors import InvalidRequestError
from terse.pipelines.cli import main
from terse.pipelines.docqa import DocQAConfig, DocQAJob, JobPaths
from terse.pipelines.docqa.job import load_inputs
from terse.pipelines.docqa.sample import reference_model_dir, write_synthetic

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(documents.jsonl, questions.jsonl): 6 seeded questions, each over ~256 tokens of documents; only
    the documents the questions name are kept, so indexing the whole corpus stays cheap."""
    docs, questions = write_synthetic(tmp_path_factory.mktemp("synth"), questions_per_kind=2, context_tokens=256)
    needed = {d for q in read_jsonl(questions) for d in q["doc_ids"]}
    docs.write_text("".join(json.dumps(d) + "\n" for d in read_jsonl(docs) if d["id"] in needed))
    return docs, questions


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def config_for(model: Path, **sections: dict[str, Any]) -> DocQAConfig:
    base = DocQAConfig(backend=f"hf:{model}").with_overrides(
        generation={"max_tokens": 6}, compression={"budget": {"target_tokens": 160}}, run={"progress": False}
    )
    return base.with_overrides(**sections) if sections else base


def test_job_answers_scores_and_accounts(tiny_llama: Path, synth: tuple[Path, Path], tmp_path: Path) -> None:
    docs, questions = synth
    paths = JobPaths(questions, (docs,), tmp_path / "answers.jsonl")
    # min_context_tokens=0: every question goes through retrieval (top-k chunks), then compression
    index_dir = tmp_path / "index"
    config = config_for(tiny_llama, retrieval={"min_context_tokens": 0, "top_k": 3, "index_dir": str(index_dir)})
    summary = DocQAJob(config, paths).run()

    records = read_jsonl(paths.output)
    gold = read_jsonl(questions)
    corpus = {d["id"]: d["text"] for d in read_jsonl(docs)}
    assert sorted(r["id"] for r in records) == sorted(q["id"] for q in gold)
    assert summary.num_answered == summary.num_questions == len(gold) and summary.num_failed == 0
    assert summary.num_scored == len(gold) and summary.accuracy is not None
    assert summary.num_correct == sum(r["correct"] for r in records)
    for record, question in zip(sorted(records, key=lambda r: r["id"]), sorted(gold, key=lambda q: q["id"])):
        usage = record["usage"]
        assert 0 < usage["prompt_tokens"] < usage["original_prompt_tokens"]
        assert usage["completion_tokens"] <= 6 and usage["latency_s"] > 0
        assert record["sources"], record
        for source in record["sources"]:
            assert source["doc_id"] in question["doc_ids"]
            assert 0 <= source["char_start"] < source["char_end"] <= len(corpus[source["doc_id"]])
    for key, field in (("original_prompt_tokens", "original_prompt_tokens"), ("prompt_tokens", "prompt_tokens"),
                       ("cached_tokens", "cached_tokens"), ("completion_tokens", "completion_tokens")):
        assert getattr(summary, field) == sum(r["usage"][key] for r in records)
    assert json.loads(paths.summary.read_text())["num_answered"] == len(gold)

    again = DocQAJob(config, paths).run()
    assert again.num_answered_this_run == 0 and again.num_answered == len(gold)
    assert read_jsonl(paths.output) == records

    # the persisted index alone is a valid documents input: texts rebuilt from chunks, offsets exact
    _, from_index, found_dir = load_inputs(JobPaths(questions, (index_dir,), tmp_path / "x.jsonl"))
    assert found_dir == index_dir and set(from_index) == set(corpus)
    for doc_id, doc in from_index.items():
        original = corpus[doc_id]
        assert len(doc.text) == len(original)
        assert all(a == b or a == " " for a, b in zip(doc.text, original))


def test_organized_answers(tiny_llama: Path, synth: tuple[Path, Path], tmp_path: Path) -> None:
    docs, questions = synth
    config = config_for(tiny_llama, organize={"mode": "auto"}, retrieval={"enabled": False})
    paths = JobPaths(questions, (docs,), tmp_path / "answers.jsonl")
    summary = DocQAJob(config, paths).run()
    assert summary.num_answered == summary.num_questions and summary.num_failed == 0
    assert summary.prompt_tokens > 0 and summary.completion_tokens > 0


def test_small_contexts_skip_retrieval_and_are_compressed_whole(
    tiny_llama: Path, synth: tuple[Path, Path], tmp_path: Path
) -> None:
    docs, questions = synth
    from terse.pipelines.docqa.answerer import BatchAnswerer
    from terse.pipelines.docqa.inputs import load_corpus, read_questions

    corpus = load_corpus([docs])
    backend = load_backend(f"hf:{tiny_llama}")
    try:
        built: list[int] = []
        config = config_for(tiny_llama, retrieval={"min_context_tokens": 100_000})
        answerer = BatchAnswerer(config, backend, corpus, questions=read_questions(questions))
        answerer.preparer.source.make_retriever = lambda: built.append(1)  # type: ignore[attr-defined]
        prepared = answerer.preparer.prepare(read_questions(questions)[0])
    finally:
        backend.close()
    assert built == []  # the index was never needed
    assert {label for label, _ in prepared.contexts} <= set(prepared.record.doc_ids)
    assert backend.count_tokens(prepared.prompt) <= prepared.original_prompt_tokens // 2


def test_whole_documents_without_retrieval_or_compression_cost_the_naive_prompt(
    tiny_llama: Path, synth: tuple[Path, Path], tmp_path: Path
) -> None:
    docs, questions = synth
    config = config_for(tiny_llama, retrieval={"enabled": False}, compression={"enabled": False})
    paths = JobPaths(questions, (docs,), tmp_path / "naive.jsonl")
    DocQAJob(config, paths).run()
    for record in read_jsonl(paths.output):
        usage = record["usage"]
        # the naive count is taken with a placeholder question: exact up to the tokenizer seam
        assert abs(usage["prompt_tokens"] - usage["original_prompt_tokens"]) <= 2


class FailingFor:
    """Delegates to a real backend but rejects prompts containing `marker` (a per-question failure)."""

    def __init__(self, backend: Any, marker: str) -> None:
        self.backend = backend
        self.marker = marker

    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestHandle:
        if isinstance(prompt, str) and self.marker in prompt:
            raise InvalidRequestError(f"prompt holds {self.marker!r}")
        handle: RequestHandle = self.backend.submit(prompt, params)
        return handle

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


def test_failed_questions_are_recorded_and_retried(tiny_llama: Path, synth: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    docs, questions = synth
    gold = read_jsonl(questions)
    gold[1]["question"] += " QQFAIL"
    edited = tmp_path / "questions.jsonl"
    edited.write_text("".join(json.dumps(q) + "\n" for q in gold), encoding="utf-8")
    config = config_for(tiny_llama, retrieval={"enabled": False}, compression={"enabled": False})
    paths = JobPaths(edited, (docs,), tmp_path / "answers.jsonl")
    backend = load_backend(config.backend)
    try:
        first = DocQAJob(config, paths, backend=FailingFor(backend, "QQFAIL")).run()  # type: ignore[arg-type]
        assert (first.num_answered, first.num_failed) == (len(gold) - 1, 1)
        (failure,) = read_jsonl(paths.failures)
        assert failure["id"] == gold[1]["id"] and failure["error_type"] == "InvalidRequestError"
        second = DocQAJob(config, paths, backend=backend).run()
    finally:
        backend.close()
    assert (second.num_answered, second.num_failed, second.num_answered_this_run) == (len(gold), 0, 1)
    ids = [r["id"] for r in read_jsonl(paths.output)]
    assert sorted(ids) == sorted(q["id"] for q in gold)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_backend_stops_cleanly(synth: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    docs, questions = synth
    out = tmp_path / "answers.jsonl"
    spec = f"openai:http://127.0.0.1:{closed_port()}/v1#m"
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"backend_options": {"probe_tokenize_endpoint": False},
                                  "run": {"max_consecutive_unavailable": 3, "batch_size": 2}}))
    code = main(["docqa", "--docs", str(docs), "--questions", str(questions), "--out", str(out),
                 "--backend", spec, "--config", str(config), "--no-retrieval", "--no-compression",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "backend unreachable" in printed and "rerun to resume" in printed
    failures = read_jsonl(out.with_name("answers.failures.jsonl"))
    assert failures and all(f["backend_unavailable"] for f in failures)
    assert all(f["error_type"] == "BackendUnavailableError" for f in failures)
    assert not out.exists() or read_jsonl(out) == []
    summary = json.loads(out.with_name("answers.summary.json").read_text())
    assert summary["num_answered"] == 0 and summary["num_pending"] + summary["num_failed"] == 6


def test_usage_errors_exit_2_with_the_line(synth: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    docs, questions = synth
    bad = tmp_path / "q.jsonl"
    bad.write_text(questions.read_text() + '{"id": "x", "question": \n', encoding="utf-8")
    code = main(["docqa", "--docs", str(docs), "--questions", str(bad), "--out", str(tmp_path / "a.jsonl"),
                 "--backend", "hf:unused", "--no-progress"])
    assert code == 2 and "q.jsonl:7: not valid JSON" in capsys.readouterr().err


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.05)


def test_kill_9_mid_run_then_rerun_answers_each_question_once(
    tiny_llama: Path, synth: tuple[Path, Path], tmp_path: Path
) -> None:
    docs, questions = synth
    base = read_jsonl(questions)
    many = [{**q, "id": f"{q['id']}-{i}"} for i in range(5) for q in base]  # 30 questions
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in many), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    argv = ["docqa", "--docs", str(docs), "--questions", str(qfile), "--out", str(out),
            "--backend", f"hf:{tiny_llama}", "--no-retrieval", "--no-compression", "--batch-size", "1",
            "--max-tokens", "16", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "terse.pipelines.cli", *argv], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 3, timeout_s=150)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    num_before = len(read_jsonl(out))
    assert 3 <= num_before < len(many), "the job must be killed mid-run"
    with out.open("ab") as f:  # what a write cut short by the kill leaves behind
        f.write(b'{"id": "' + many[-1]["id"].encode() + b'", "answer": "tor')
    assert main(argv) == 0
    ids = [r["id"] for r in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == len(many)
    assert set(ids) == {q["id"] for q in many}


@pytest.mark.skipif(reference_model_dir() is None, reason="this checkout has no bundled reference model")
def test_reference_model_demo_defaults(synth: tuple[Path, Path], tmp_path: Path) -> None:
    from terse.pipelines.cli_demo import default_backend

    docs, questions = synth
    config = DocQAConfig(backend=default_backend()).with_overrides(run={"progress": False})
    paths = JobPaths(questions, (docs,), tmp_path / "answers.jsonl")
    summary = DocQAJob(config, paths).run()
    assert summary.num_answered == summary.num_questions and summary.accuracy is not None
    assert summary.prompt_tokens < summary.original_prompt_tokens


def test_demo_runs_the_bundled_sample_and_prints_the_table(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "demo"
    argv = ["demo", "--out-dir", str(out_dir), "--backend", f"hf:{tiny_llama}", "--limit", "2",
            "--max-tokens", "4", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "terse docqa" in printed and "tokens saved" in printed and "accuracy (exact match)" in printed
    assert len(read_jsonl(out_dir / "answers.jsonl")) == 2
    assert main(argv) == 0  # a rerun resumes: nothing left to answer
    assert "0 this run" in capsys.readouterr().out
