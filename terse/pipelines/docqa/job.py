"""`DocQAJob`: a folder of documents and a file of questions in, an answers file out. Resumable.

    questions.jsonl ─┐                                     ┌─► answers.jsonl   (one line per answer)
    documents/ ──────┼─► pending ids ─► batches ─► answer ─┼─► failures.jsonl  (retried on rerun)
    answers.jsonl ───┘   (not yet answered)                └─► summary.json

A rerun reads the answers file (dropping a torn last line), skips every id in it and retries the
rest, failures included. Each answer is written durably as soon as its batch finishes, so a killed
job loses at most the batch in flight. Batches are formed from questions sorted by their documents,
so questions over the same documents are generated together and share their prefill.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terse.backend.base import Backend
from terse.backend.registry import load_backend
from terse.errors import ConfigError
from terse.pipelines.docqa.config import DocQAConfig
from terse.pipelines.docqa.contexts import documents_of_index, is_index_dir
from terse.pipelines.docqa.inputs import check_documents, load_corpus, read_questions
from terse.pipelines.docqa.journal import JsonlJournal
from terse.pipelines.docqa.records import AnswerRecord, FailureRecord, QuestionRecord
from terse.pipelines.docqa.summary import JobSummary, earlier_wall_s, summarize, write_summary
from terse.retrieval.types import Document

ProgressFn = Callable[[int], None]
"""Called with the number of questions just finished."""

BatchFn = Callable[
    [Sequence[QuestionRecord], dict[str, Document], "Path | None"], Iterator[list[AnswerRecord | FailureRecord]]
]
"""(pending questions, corpus, saved index dir or None) -> each batch's records, as batches finish.
Implemented here (single process) and by the Ray executor."""


@dataclass(frozen=True)
class JobPaths:
    """Where a job reads and writes."""

    questions: Path
    """Questions JSONL."""
    documents: tuple[Path, ...]
    """Document folders / files, or one saved retrieval index directory."""
    output: Path
    """Answers JSONL (appended to; its ids are skipped on rerun)."""

    @property
    def failures(self) -> Path:
        """`<output stem>.failures.jsonl` beside the answers."""
        return self.output.with_name(self.output.stem + ".failures.jsonl")

    @property
    def summary(self) -> Path:
        """`<output stem>.summary.json` beside the answers."""
        return self.output.with_name(self.output.stem + ".summary.json")


def load_inputs(paths: JobPaths) -> tuple[list[QuestionRecord], dict[str, Document], Path | None]:
    """Questions, corpus and (when the documents path is a saved index) that index's directory."""
    questions = read_questions(paths.questions)
    index_dir = paths.documents[0] if len(paths.documents) == 1 and is_index_dir(paths.documents[0]) else None
    corpus = documents_of_index(index_dir) if index_dir is not None else load_corpus(paths.documents)
    where = str(index_dir) if index_dir is not None else ", ".join(str(p) for p in paths.documents)
    check_documents(questions, corpus, where)
    return questions, corpus, index_dir


def order_pending(questions: Sequence[QuestionRecord], done_ids: set[str]) -> list[QuestionRecord]:
    """Unanswered questions, those naming the same documents next to each other (first-seen order)."""
    groups: dict[tuple[str, ...], list[QuestionRecord]] = {}
    for q in questions:
        if q.id not in done_ids:
            groups.setdefault(q.doc_ids, []).append(q)
    return [q for group in groups.values() for q in group]


class DocQAJob:
    """Runs one job; `run()` may be called again on the same paths to resume."""

    def __init__(self, config: DocQAConfig, paths: JobPaths, backend: Backend | None = None) -> None:
        if backend is None and not config.backend:
            raise ConfigError("no backend: set `backend` in the config or pass --backend, e.g. local:path/to/model")
        self.config = config
        self.paths = paths
        self._backend = backend
        self.stage_seconds: dict[str, float] = {}
        """Where the last `run()`'s time went (single-process runs): "prepare" (preparation the
        generation waited for), "generate" (waiting for answers), and "prepare_overlapped"
        (preparation that ran while the backend generated: on worker processes, or in this process
        with batches submitted ahead)."""
    def run(self, progress: ProgressFn | None = None, batch_fn: BatchFn | None = None,
            on_start: Callable[[int], None] | None = None) -> JobSummary:
        """Answer every pending question; return the summary (also written to `paths.summary`).

        `batch_fn` replaces the single-process answering (the Ray executor passes its own);
        `on_start` is told how many questions are pending before the first batch.
        """
        start = time.perf_counter()
        questions, corpus, index_dir = load_inputs(self.paths)
        with JsonlJournal(self.paths.output) as answers, JsonlJournal(self.paths.failures) as failures:
            earlier = earlier_wall_s(self.paths.summary) if answers.records or failures.records else 0.0
            pending = order_pending(questions, answers.ids())
            if on_start is not None:
                on_start(len(pending))
            run_batches = batch_fn or self.local_batches
            batches = run_batches(pending, corpus, index_dir) if pending else iter(())
            try:
                written, _latencies, stopped = self._consume(batches, answers, failures, progress)
            finally:
                close = getattr(batches, "close", None)
                if close is not None:  # a stopped run releases its backend now, not at collection
                    close()
            # totals cover this questions file only (an answers file may hold other ids)
            question_ids = {q.id for q in questions}
            failed_ids = {str(r["id"]) for r in failures.records} & question_ids
            summary = summarize(
                len(questions),
                [AnswerRecord.from_json(r) for r in answers.records if str(r["id"]) in question_ids],
                failed_ids,
                written,
                time.perf_counter() - start,
                stopped,
                earlier,
            )
        write_summary(summary, self.paths.summary)
        return summary

    def _consume(self, batches: Iterator[list[AnswerRecord | FailureRecord]], answers: JsonlJournal,
                 failures: JsonlJournal, progress: ProgressFn | None) -> tuple[int, list[float], str | None]:
        written, latencies, num_unavailable = 0, [], 0
        limit = self.config.run.max_consecutive_unavailable
        for records in batches:
            for record in records:
                if isinstance(record, AnswerRecord):
                    answers.append(record.to_json())
                    written += 1
                    latencies.append(record.usage.latency_s)
                    num_unavailable = 0
                else:
                    failures.append(record.to_json())
                    num_unavailable = num_unavailable + 1 if record.backend_unavailable else 0
            if progress is not None:
                progress(len(records))
            if num_unavailable >= limit:
                last = failures.records[-1]
                return written, latencies, (
                    f"backend unreachable: {num_unavailable} questions in a row failed "
                    f"({last['error_type']}: {last['error']}); answers so far are kept, rerun to resume"
                )
        return written, latencies, None

    def local_batches(
        self, pending: Sequence[QuestionRecord], corpus: dict[str, Document], index_dir: Path | None
    ) -> Iterator[list[AnswerRecord | FailureRecord]]:
        """The single-process `BatchFn`: one backend, batches of `run.batch_size` in order."""
        from terse.pipelines.docqa.answerer import BatchAnswerer

        backend = self._backend or load_backend(self.config.backend, **self.config.backend_options)
        try:
            retriever = open_index(index_dir) if self.config.retrieval.enabled else None
            answerer = BatchAnswerer(self.config, backend, corpus, retriever, pending)
            size = self.config.run.batch_size
            batches = [pending[i : i + size] for i in range(0, len(pending), size)]
            yield from prepare_ahead(answerer, batches, self.config, self.stage_seconds)
        finally:
            if self._backend is None:
                backend.close()


def prepare_ahead(answerer: Any, batches: Sequence[Sequence[QuestionRecord]], config: DocQAConfig,
                  seconds: dict[str, float]) -> Iterator[list[AnswerRecord | FailureRecord]]:
    """Answer `batches` in order, preparing batch N+1 while batch N generates.

    With worker processes (`run.prepare_processes`):

        main:     prepare 0 | generate 0         | generate 1         | ...
        ahead:              | prepare 1 (procs)  | prepare 2 (procs)  |

    In this process, with a dispatch that submits ahead (a local or hf backend generates on its own
    thread): batch N+1 is prepared while batch N generates and submitted before batch N's answers
    are collected, so the engine is never idle between batches and runs both in the same steps:

        main:     prepare 0, submit 0 | prepare 1, submit 1 | collect 0 | prepare 2, submit 2 | collect 1 | ...
        engine:                       | generate 0 ...................| generate 1 ...................|

    A compressor that calls the model prepares ahead in this process too: its scoring requests reach
    the backend while it generates (the local engine runs them in its steps; hf takes turns on its
    model lock). Otherwise (organized or async dispatch, `run.submit_ahead` off) batches run one after
    the other, as `BatchAnswerer.answer` does. Answers are yielded batch by batch in order either way.
    `seconds` receives the split of the time (see `DocQAJob.stage_seconds`).
    """
    from concurrent.futures import ThreadPoolExecutor

    from terse.pipelines.docqa.prepare_pool import PreparePool, auto_processes

    seconds.update(prepare=0.0, generate=0.0, prepare_overlapped=0.0)
    num_questions = sum(len(b) for b in batches)
    num_processes = auto_processes(config.run.prepare_processes, num_questions) if len(batches) > 1 else 0
    pool = PreparePool.for_compressor(answerer.preparer.compressor, num_processes, config.run.prepare_start_method)
    if pool is None and len(batches) > 1 and config.run.submit_ahead and getattr(answerer, "submits_ahead", False):
        yield from submit_ahead(answerer, batches, seconds)
        return

    def timed_prepare(batch: Sequence[QuestionRecord]) -> tuple[list[Any], float]:
        t0 = time.perf_counter()
        return answerer.prepare(batch, pool), time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="terse-prepare-ahead") as ahead:
            t0 = time.perf_counter()
            items = answerer.prepare(batches[0]) if batches else []
            seconds["prepare"] += time.perf_counter() - t0
            for k, batch in enumerate(batches):
                upcoming = ahead.submit(timed_prepare, batches[k + 1]) if pool and k + 1 < len(batches) else None
                t0 = time.perf_counter()
                records = answerer.generate(batch, items)
                seconds["generate"] += time.perf_counter() - t0
                yield records
                if k + 1 == len(batches):
                    break
                t0 = time.perf_counter()
                if upcoming is not None:
                    items, took = upcoming.result()
                    seconds["prepare_overlapped"] += took
                else:
                    items = answerer.prepare(batches[k + 1])
                seconds["prepare"] += time.perf_counter() - t0
    finally:
        if pool is not None:
            pool.close()


def submit_ahead(answerer: Any, batches: Sequence[Sequence[QuestionRecord]], seconds: dict[str, float]
                 ) -> Iterator[list[AnswerRecord | FailureRecord]]:
    """`prepare_ahead` in this process: batch N+1 prepared and submitted before batch N is collected.

    At most two batches are in flight. If the consumer stops early (a job ending after too many
    unreachable-backend failures), the batch submitted ahead is cancelled; its questions stay pending
    and a rerun answers them."""
    t0 = time.perf_counter()
    pending = answerer.start(batches[0], answerer.prepare(batches[0]))
    seconds["prepare"] += time.perf_counter() - t0
    try:
        for k in range(len(batches)):
            following = None
            if k + 1 < len(batches):
                t0 = time.perf_counter()
                items = answerer.prepare(batches[k + 1])
                following = answerer.start(batches[k + 1], items)
                seconds["prepare_overlapped"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            records = answerer.finish(pending)
            seconds["generate"] += time.perf_counter() - t0
            pending = following
            yield records
    finally:
        if pending is not None:
            answerer.cancel(pending)


def open_index(index_dir: Path | None) -> Any | None:
    """The saved index to search, or None (the answerer then builds one in memory if retrieval is on)."""
    if index_dir is None:
        return None
    from terse.retrieval import Retriever

    return Retriever.open(index_dir)
