"""The doc-QA job on Ray Data (a real single-node cluster): each batch's questions meet only their
documents, and `terse docqa --ray` gives the single-process answers and summary, for questions over
several documents and over none, resuming a partial answers file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from terse.pipelines.cli import main  # noqa: E402
from terse.pipelines.docqa.ray_job import NUM_DATA_CPUS, batch_groups, plan_batches  # noqa: E402
from terse.pipelines.docqa.records import QuestionRecord  # noqa: E402
from terse.pipelines.docqa.sample import write_synthetic  # noqa: E402
from terse.retrieval.types import Document  # noqa: E402

NUM_ACTORS = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    # the logical CPUs `terse docqa --ray` gives a local cluster for two actors, more than the physical
    # cores: with fewer, every run waits on Ray Data's resource budget
    ray.init(num_cpus=NUM_ACTORS + NUM_DATA_CPUS, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def question(qid: str, *doc_ids: str) -> QuestionRecord:
    return QuestionRecord(qid, f"question {qid}?", doc_ids)


def test_plan_routes_each_document_to_the_batches_naming_it() -> None:
    pending = [question("a", "d1", "d2"), question("b", "d2"), question("c", "d3"), question("d"),
               question("e", "d1")]
    plan = plan_batches(pending, ["d1", "d2", "d3", "d4"], batch_size=2)
    assert [[q.id for q in batch] for batch in plan.batches] == [["a", "b"], ["c", "d"], ["e"]]
    # batch 1 asks "d" over the whole corpus, so every document goes there
    assert plan.batches_of_document == {"d1": [0, 1, 2], "d2": [0, 1], "d3": [1], "d4": [1]}


def test_each_group_is_one_batch_with_only_its_documents(cluster: None) -> None:
    corpus = {d: Document(d, f"text of {d}", {"title": d.upper()}) for d in ("d1", "d2", "d3", "d4", "d5")}
    pending = [question("a", "d1", "d2"), question("b", "d2"), question("c", "d3", "d1"),
               question("d", "d3"), question("e", "d4")]
    plan = plan_batches(pending, corpus, batch_size=2)

    def contents(group: dict[str, Any]) -> dict[str, list[Any]]:
        records = [(kind, json.loads(line)) for kind, line in zip(group["kind"], group["record"])]
        questions = sorted((r["position"], r["id"]) for kind, r in records if kind == "question")
        documents = {r["id"]: (r["text"], r["metadata"]["title"])
                     for kind, r in records if kind == "document"}
        return {"batch": [int(group["batch"][0])], "questions": [[qid for _, qid in questions]],
                "documents": [json.dumps(documents, sort_keys=True)]}

    rows = batch_groups(plan, corpus).map_groups(contents, batch_format="numpy").take_all()
    found = {r["batch"]: (list(r["questions"]), json.loads(r["documents"])) for r in rows}
    assert found == {
        0: (["a", "b"], {"d1": ["text of d1", "D1"], "d2": ["text of d2", "D2"]}),
        1: (["c", "d"], {"d1": ["text of d1", "D1"], "d3": ["text of d3", "D3"]}),
        2: (["e"], {"d4": ["text of d4", "D4"]}),
    }  # d5 is named by no question and goes nowhere


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(documents.jsonl, questions.jsonl, job config): six seeded questions over two documents or one,
    then one naming no documents (asked over the whole corpus, through the retrieval index)."""
    directory = tmp_path_factory.mktemp("synth")
    docs, questions = write_synthetic(directory, questions_per_kind=2, context_tokens=256)
    records = read_jsonl(questions)
    # only the documents the questions name: a small corpus keeps the whole-corpus question cheap
    needed = {d for q in records for d in q["doc_ids"]}
    docs.write_text("".join(json.dumps(d) + "\n" for d in read_jsonl(docs) if d["id"] in needed))
    anywhere = {"id": "anywhere", "question": records[0]["question"], "answer": records[0]["answer"]}
    questions.write_text(questions.read_text() + json.dumps(anywhere) + "\n")
    config = directory / "job.json"
    # one prompt per forward pass, so answers cannot depend on how questions were batched; every
    # question goes through retrieval (min_context_tokens 0)
    config.write_text(json.dumps({
        "backend_options": {"max_batch_size": 1}, "generation": {"max_tokens": 6},
        "compression": {"budget": {"target_tokens": 160}}, "retrieval": {"min_context_tokens": 0},
        "run": {"progress": False, "batch_size": 2},
    }))
    return docs, questions, config


@pytest.fixture(scope="module")
def single_process(tiny_llama: Path, synth: tuple[Path, Path, Path],
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The answers file of `terse docqa` without Ray (its summary beside it)."""
    docs, questions, config = synth
    out = tmp_path_factory.mktemp("single") / "answers.jsonl"
    assert main(["docqa", "--docs", str(docs), "--questions", str(questions), "--out", str(out),
                 "--backend", f"hf:{tiny_llama}", "--config", str(config), "--no-progress"]) == 0
    return out


def comparable_answers(path: Path) -> dict[str, dict[str, Any]]:
    """Answer records by id, without their latency."""
    records = {r["id"]: r for r in read_jsonl(path)}
    for r in records.values():
        del r["usage"]["latency_s"]
    return records


def comparable_summary(path: Path) -> dict[str, Any]:
    """The summary without what depends on time or on this run alone."""
    timing = ("wall_s", "total_wall_s", "mean_latency_s", "questions_per_s", "num_answered_this_run")
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in timing}


def test_cli_on_ray_resumes_and_matches_single_process(
    tiny_llama: Path, synth: tuple[Path, Path, Path], single_process: Path, tmp_path: Path, cluster: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    docs, questions, config = synth
    gold = read_jsonl(questions)
    assert any(len(q["doc_ids"]) > 1 for q in gold) and any("doc_ids" not in q for q in gold)
    # the first three answers are already on file; the cluster answers the rest, the whole-corpus one too
    out = tmp_path / "answers.jsonl"
    out.write_text("".join(line + "\n" for line in single_process.read_text().splitlines()[:3]))
    assert "anywhere" not in comparable_answers(out)
    capsys.readouterr()
    # the CLI joins the cluster the fixture started (it starts a local one only when none is running)
    assert main(["docqa", "--docs", str(docs), "--questions", str(questions), "--out", str(out),
                 "--backend", f"hf:{tiny_llama}", "--config", str(config), "--no-progress",
                 "--ray", "--ray-actors", str(NUM_ACTORS)]) == 0
    assert "terse docqa" in capsys.readouterr().out
    assert len(read_jsonl(out)) == len(gold)
    assert comparable_answers(out) == comparable_answers(single_process)
    summary = out.with_name("answers.summary.json")
    assert json.loads(summary.read_text())["num_answered_this_run"] == len(gold) - 3
    assert comparable_summary(summary) == comparable_summary(single_process.with_name("answers.summary.json"))
