"""doc-QA inputs, config, journal, summary and scheduling: pure, no model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from terse.compress import Budget
from terse.errors import ConfigError, InvalidRequestError
from terse.pipelines.docqa.config import DOCQA_COMPRESSOR, DOCQA_GENERATION, DocQAConfig, load_config
from terse.pipelines.docqa.inputs import check_documents, load_corpus, read_questions
from terse.pipelines.docqa.job import order_pending
from terse.pipelines.docqa.journal import JsonlJournal
from terse.pipelines.docqa.openai_batch import batch_output_line, convert_batch_input
from terse.pipelines.docqa.prepare import PreparedQuestion, schedule
from terse.pipelines.docqa.records import AnswerRecord, QAUsage, QuestionRecord, Source
from terse.pipelines.docqa.summary import summarize
from terse.retrieval import ChunkerConfig


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- questions file ------------------------------------------------------------------------------
def test_read_questions_parses_optional_fields(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "q.jsonl", [
        json.dumps({"id": 1, "question": "Who?", "doc_ids": ["a", "b"], "answer": "Ann"}),
        "",
        json.dumps({"id": "x", "question": "Which?", "items": ["p", "q"]}),
    ])
    q1, q2 = read_questions(path)
    assert (q1.id, q1.doc_ids, q1.answer, q1.line_no) == ("1", ("a", "b"), "Ann", 1)
    assert (q2.id, q2.doc_ids, q2.answer, q2.items, q2.line_no) == ("x", (), None, ("p", "q"), 3)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"id": "a", "question": "ok?"', "q.jsonl:2: not valid JSON"),
        ('["not", "an", "object"]', "q.jsonl:2: expected a JSON object"),
        ('{"question": "no id"}', "q.jsonl:2: 'id'"),
        ('{"id": "b", "question": "  "}', "q.jsonl:2: 'question'"),
        ('{"id": "b", "question": "q", "doc_ids": "a"}', "q.jsonl:2: 'doc_ids'"),
        ('{"id": "first", "question": "again"}', "q.jsonl:2: duplicate question id 'first' (first on line 1)"),
    ],
)
def test_read_questions_reports_line_numbers(tmp_path: Path, line: str, fragment: str) -> None:
    path = write_lines(tmp_path / "q.jsonl", [json.dumps({"id": "first", "question": "q?"}), line])
    with pytest.raises(InvalidRequestError) as info:
        read_questions(path)
    assert fragment in str(info.value)


def test_missing_questions_file_and_documents(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="does not exist"):
        read_questions(tmp_path / "nope.jsonl")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Alpha text.", encoding="utf-8")
    (docs / "b.md").write_text("# Beta", encoding="utf-8")
    corpus = load_corpus([docs])
    assert sorted(corpus) == ["a.txt", "b.md"]
    questions = [QuestionRecord("q7", "Where?", ("a.txt", "c.txt"), line_no=7)]
    with pytest.raises(InvalidRequestError) as info:
        check_documents(questions, corpus, str(docs))
    message = str(info.value)
    assert "'q7' (line 7)" in message and "['c.txt']" in message and "a.txt" in message
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_corpus([tmp_path / "missing-dir"])


# -- config --------------------------------------------------------------------------------------
def test_config_files_round_trip_and_reject_unknown_keys(tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('backend = "hf:m"\n[retrieval]\ntop_k = 2\n[generation]\nstop = ["\\n"]\n'
                    '[run]\nbatch_size = 3\n', encoding="utf-8")
    config = load_config(toml)
    assert (config.backend, config.retrieval.top_k, config.generation.stop, config.run.batch_size) == (
        "hf:m", 2, ("\n",), 3)
    as_json = tmp_path / "job.json"
    as_json.write_text(json.dumps(config.to_dict()), encoding="utf-8")
    assert load_config(as_json) == config
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['topk'\] in section 'retrieval'"):
        DocQAConfig.from_dict({"retrieval": {"topk": 3}})
    with pytest.raises(ConfigError, match="unknown config key"):
        DocQAConfig.from_dict({"retreival": {}})
    bad = tmp_path / "bad.toml"
    bad.write_text("backend = ", encoding="utf-8")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(bad)


def test_nested_sections_change_only_what_they_name(tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text('[retrieval.retriever.chunker]\nchunk_tokens = 96\n[compression.budget]\nrate = 0.3\n'
                    '[compression.compressor]\nranker = "embedding"\n[generation]\nseed = 7\n', encoding="utf-8")
    config = load_config(toml)
    default = DocQAConfig()
    assert config.retrieval.retriever.chunker == ChunkerConfig(chunk_tokens=96, overlap_tokens=16)
    assert config.retrieval.retriever.embedder == default.retrieval.retriever.embedder
    assert config.compression.budget == Budget(rate=0.3)  # the rate replaces the default target
    assert config.compression.compressor == replace(DOCQA_COMPRESSOR, ranker="embedding")
    assert config.generation == replace(DOCQA_GENERATION, seed=7)
    assert DocQAConfig.from_dict(config.to_dict()) == config
    again = config.with_overrides(compression={"budget": {"target_tokens": 100}})
    assert again.compression.budget == Budget(target_tokens=100)
    assert again.compression.compressor == config.compression.compressor


@pytest.mark.parametrize(
    ("section", "values", "fragment"),
    [
        ("retrieval", {"top_k": 0}, "retrieval.top_k=0"),
        ("retrieval", {"retriever": {"chunker": {"chunk_tokens": 64, "overlap_tokens": 40}}},
         "retrieval.retriever.chunker.overlap_tokens=40"),
        ("retrieval", {"retriever": {"chunkr": {}}}, "unknown key(s) ['chunkr'] in section 'retrieval.retriever'"),
        ("compression", {"budget": {"target_tokens": None}}, "exactly one of"),
        ("compression", {"budget": {"rate": 1.5}}, "compression.budget.rate=1.5"),
        ("compression", {"compressor": {"reorder": "random"}}, "compression.compressor.reorder='random'"),
        ("compression", {"budget": 240}, "compression.budget=240 must be a table / object of Budget fields"),
        ("organize", {"mode": "fancy"}, "organize.mode='fancy'"),
        ("generation", {"max_tokens": -1}, "generation.max_tokens=-1"),
        ("generation", {"max_tokens": 0}, "generation.max_tokens=0"),
        ("generation", {"top_p": 0}, "generation.top_p=0"),
        ("run", {"dispatch": "threads"}, "run.dispatch='threads'"),
        ("run", {"runner": "batch"}, "run.runner is now run.dispatch"),
        ("compression", {"target_tokens": 240}, "compression.target_tokens is now compression.budget.target_tokens"),
        ("retrieval", {"embedder": "x"}, "retrieval.embedder is now retrieval.retriever.embedder.model"),
        ("run", {"requests_per_s": 0}, "run.requests_per_s=0"),
    ],
)
def test_config_validation_names_the_field(section: str, values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        DocQAConfig().with_overrides(**{section: values})
    assert fragment in str(info.value)


# -- journal -------------------------------------------------------------------------------------
def test_journal_drops_a_torn_last_line_and_appends_after_it(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"id": "a", "answer": "1"}\n{"id": "b", "answer": "2"}\n{"id": "c", "ans')
    journal = JsonlJournal(path)
    assert journal.ids() == {"a", "b"} and journal.num_torn_lines == 1
    journal.append({"id": "c", "answer": "3"})
    journal.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]


def test_journal_treats_an_unparsable_final_line_as_torn(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "answ\n')
    journal = JsonlJournal(path)
    assert journal.ids() == {"a"} and journal.num_torn_lines == 1
    assert path.read_bytes() == b'{"id": "a"}\n'


def test_journal_refuses_corruption_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"id": "a"}\nGARBAGE\n{"id": "c"}\n')
    with pytest.raises(InvalidRequestError, match="answers.jsonl:2"):
        JsonlJournal(path)


# -- summary and scheduling ----------------------------------------------------------------------
def _answer(qid: str, correct: bool | None, original: int, sent: int) -> AnswerRecord:
    return AnswerRecord(qid, "x", (Source("d", 0, 1),), QAUsage(original, sent, 2, 3, 0.5), correct)


def test_summary_counts_and_sums() -> None:
    answers = [_answer("a", True, 100, 20), _answer("b", False, 100, 30), _answer("c", None, 50, 10)]
    summary = summarize(5, answers, {"b", "d"}, num_answered_this_run=2, wall_s=4.0)
    assert (summary.num_answered, summary.num_failed, summary.num_pending) == (3, 1, 1)
    assert (summary.num_scored, summary.num_correct, summary.accuracy) == (2, 1, 0.5)
    assert (summary.original_prompt_tokens, summary.prompt_tokens, summary.tokens_saved) == (250, 60, 190)
    assert summary.token_reduction == pytest.approx(250 / 60)
    assert (summary.cached_tokens, summary.completion_tokens) == (6, 9)
    assert summary.questions_per_s == 0.75 and summary.mean_latency_s == 0.5  # over every answer on file
    assert json.loads(json.dumps(summary.to_json()))["accuracy"] == 0.5


def test_a_resumed_run_reports_the_whole_jobs_time_and_rate(tmp_path: Path) -> None:
    from terse.pipelines.docqa.summary import earlier_wall_s, write_summary

    answers = [_answer("a", True, 100, 20), _answer("b", True, 100, 30)]
    first = summarize(2, answers, set(), num_answered_this_run=2, wall_s=8.0)
    write_summary(first, tmp_path / "s.json")
    resumed = summarize(2, answers, set(), num_answered_this_run=0, wall_s=0.01,
                        earlier_wall_s=earlier_wall_s(tmp_path / "s.json"))
    assert resumed.total_wall_s == pytest.approx(8.01) and resumed.questions_per_s == pytest.approx(2 / 8.01)
    assert dict(resumed.rows())["wall time"] == "8.0 s (0.0 s this run)"
    assert earlier_wall_s(tmp_path / "missing.json") == 0.0


def test_questions_over_the_same_documents_are_scheduled_together() -> None:
    qs = [QuestionRecord(str(i), "q?", (doc,)) for i, doc in enumerate("abab")]
    assert [q.id for q in order_pending(qs, done_ids={"2"})] == ["0", "1", "3"]
    prepared = [
        PreparedQuestion(q, (), (), "", (), 0, ((q.doc_ids[0], 0, 5),)) for q in qs
    ]
    assert [p.record.id for p in schedule(prepared)] == ["0", "2", "1", "3"]


# -- OpenAI Batch format -------------------------------------------------------------------------
def test_openai_batch_input_and_output(tmp_path: Path) -> None:
    request = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "m", "messages": [{"role": "system", "content": "s"},
                                                    {"role": "user", "content": "Who founded X?"}],
                        "metadata": {"doc_ids": "a.txt, b.txt", "answer": "Ann"}}}
    path = write_lines(tmp_path / "batch.jsonl", [json.dumps(request)])
    (question,) = read_questions(convert_batch_input(path, tmp_path / "q.jsonl"))
    assert (question.id, question.question, question.doc_ids, question.answer) == (
        "r1", "Who founded X?", ("a.txt", "b.txt"), "Ann")
    line = batch_output_line(_answer("r1", True, 10, 4).to_json(), model="m")
    assert line["custom_id"] == "r1" and line["response"]["status_code"] == 200
    assert line["response"]["body"]["usage"]["prompt_tokens"] == 4
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"custom_id": "r2", "body": {}})])
    with pytest.raises(InvalidRequestError, match="bad.jsonl:1"):
        convert_batch_input(bad, tmp_path / "q2.jsonl")
