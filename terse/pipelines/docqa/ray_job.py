"""The doc-QA job on Ray Data: documents and questions as datasets, co-grouped by batch, answered in
an actor pool that owns backends.

    driver: pending questions ─► plan_batches (ids only): the single-process job's batches, and for
            each document the batches that need it

    corpus  ─► documents {doc_id, text, metadata} ─► flat_map: a row per batch needing the document ─┐
    pending ─► questions {batch, question} ──────────────────────────────────────────────────────────┴─►
        union ─► groupby(batch) ─► map_groups(AnswerActor, ActorPoolStrategy(size=N), num_gpus=G each)
              ─► iter_batches ─► the same journals as the single-process job

A group is one batch: its questions and only the documents they name, so an actor holds the documents
of the batches in hand, never the corpus. A document named in several batches travels once to each;
the job orders questions over the same documents together, so that is rare. A question naming no
documents is asked over the whole corpus (its naive prompt, counted for the summary and pasted when
small enough, holds every document), so its batch carries them all; such questions are ordered
together too, so few batches do. The retrieval index is built (or reopened) once by the driver and
saved beside the answers; actors reopen it from disk.

Each actor builds its backend, context source and compressor once and answers each batch with the
same `BatchAnswerer` as the single-process job, over the same batches, so greedy answers are the same.
The driver writes records as they arrive, so a Ray run is resumable exactly like a local one.

Needs the `ray` extra (`pip install 'terse[ray]'`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from terse.errors import ConfigError
from terse.pipelines.docqa.config import DocQAConfig
from terse.pipelines.docqa.contexts import may_need_retrieval
from terse.pipelines.docqa.job import BatchFn, DocQAJob
from terse.pipelines.docqa.records import AnswerRecord, FailureRecord, QuestionRecord
from terse.retrieval.types import Document


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray run is."""

    address: str | None = None
    """Cluster address ("ray://host:10001", "auto"); None starts or joins a local cluster."""
    num_actors: int = 1
    """Generation actors, each with its own backend."""
    num_gpus_per_actor: float | None = None
    """GPUs per actor; None: 1 when the cluster has GPUs, else 0."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved per actor."""
    verbose: bool = False
    """Show Ray's own logs and Ray Data's progress reports (off: warnings and errors only)."""

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ConfigError(f"num_actors={self.num_actors} must be >= 1")
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise ConfigError(f"num_gpus_per_actor={self.num_gpus_per_actor} must be >= 0")
        if self.num_cpus_per_actor <= 0:
            raise ConfigError(f"num_cpus_per_actor={self.num_cpus_per_actor} must be > 0")


class BatchPlan(NamedTuple):
    """Which questions are answered together, and which documents each batch needs."""

    batches: list[list[QuestionRecord]]
    """Consecutive slices of the pending questions, `batch_size` each (the last may be shorter)."""
    batches_of_document: dict[str, list[int]]
    """Document id -> indices of the batches needing it, ascending; documents no batch needs are absent."""


def plan_batches(pending: Sequence[QuestionRecord], doc_ids: Iterable[str], batch_size: int) -> BatchPlan:
    """Cut `pending` into batches and route documents to them: a batch needs every document its
    questions name, and the whole corpus (`doc_ids`) when one of them names none."""
    batches = [list(pending[i : i + batch_size]) for i in range(0, len(pending), batch_size)]
    all_ids = list(doc_ids)
    batches_of_document: dict[str, list[int]] = {}
    for index, batch in enumerate(batches):
        needed = all_ids if any(not q.doc_ids for q in batch) else {d for q in batch for d in q.doc_ids}
        for doc_id in needed:
            batches_of_document.setdefault(doc_id, []).append(index)
    return BatchPlan(batches, batches_of_document)


class AnswerActor:
    """A Ray Data actor: owns one backend; each call answers one group, i.e. one batch's question rows
    with the rows of the documents those questions need (see `batch_groups`)."""

    def __init__(self, config: dict[str, Any], index_dir: str | None) -> None:
        from terse.backend.registry import load_backend

        self.config = DocQAConfig.from_dict(config)
        self.index_dir = index_dir
        self.backend = load_backend(self.config.backend, **self.config.backend_options)
        # The answerer reads documents through this dict, refilled before every batch with exactly the
        # documents of that batch; its caches are keyed by document ids, so they stay valid across batches.
        self.documents: dict[str, Document] = {}
        self._answerer: Any = None

    def _get_answerer(self) -> Any:
        # Built on the first batch, not in __init__: Ray calls __init__ and __call__ on different
        # threads, and the index's SQLite store may only be used by the thread that opened it.
        if self._answerer is None:
            from terse.pipelines.docqa.answerer import BatchAnswerer
            from terse.pipelines.docqa.job import open_index

            # the driver saved an index whenever a question may be routed to retrieval
            use_index = self.index_dir is not None and self.config.retrieval.enabled
            retriever = open_index(Path(self.index_dir)) if use_index and self.index_dir else None
            self._answerer = BatchAnswerer(self.config, self.backend, self.documents, retriever)
        return self._answerer

    def __call__(self, group: dict[str, Any]) -> dict[str, list[str]]:
        positioned: list[tuple[int, QuestionRecord]] = []
        documents: dict[str, Document] = {}
        for kind, line in zip(group["kind"], group["record"]):
            data = json.loads(str(line))
            if kind == "question":
                positioned.append((data["position"], question_from_json(data)))
            else:
                documents[data["id"]] = Document(data["id"], data["text"], data["metadata"])
        self.documents.clear()
        self.documents.update(documents)
        # the shuffle does not keep row order; the batch is answered in the single-process job's order
        questions = [q for _, q in sorted(positioned, key=lambda pq: pq[0])]
        records = self._get_answerer().answer(questions)
        return {
            "kind": ["answer" if isinstance(r, AnswerRecord) else "failure" for r in records],
            "record": [json.dumps(r.to_json()) for r in records],
        }


def question_to_json(q: QuestionRecord) -> dict[str, Any]:
    return {"id": q.id, "question": q.question, "doc_ids": list(q.doc_ids), "answer": q.answer,
            "items": list(q.items), "line_no": q.line_no}


def question_from_json(data: dict[str, Any]) -> QuestionRecord:
    return QuestionRecord(data["id"], data["question"], tuple(data["doc_ids"]), data["answer"],
                          tuple(data["items"]), data["line_no"])


NUM_DATA_CPUS = 5
"""Logical CPUs a local cluster gets beside the actor pool. Ray Data reserves a minimum of CPUs for each
operator of the co-grouping (fan-out, shuffle map, shuffle reduce) before it schedules them; measured
with Ray 2.60, with fewer than 5 spare every run stalls on those reservations (over 10 s for a handful
of questions, against about 2 s)."""


def ensure_ray(options: RayOptions) -> Any:
    """Connect to (or start) the cluster unless this process already did.

    A local cluster gets at least `NUM_DATA_CPUS` logical CPUs more than the actors reserve.
    """
    import ray
    import ray.data

    quiet: dict[str, Any] = {} if options.verbose else {"logging_level": logging.ERROR}
    if not ray.is_initialized():
        if options.address is None:
            reserved = math.ceil(options.num_actors * options.num_cpus_per_actor)
            num_cpus = max(os.cpu_count() or 1, reserved + NUM_DATA_CPUS)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **quiet)
        else:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False, **quiet)
    if not options.verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray


def batch_groups(plan: BatchPlan, corpus: dict[str, Document]) -> Any:
    """The documents and questions datasets co-grouped by batch (a lazy `ray.data` `GroupedData`):
    each group holds one batch's question rows and a row for each document the batch needs.

    Rows: {batch, kind: "question" | "document", record: JSON}; a question record also holds the
    question's position in its batch, since the shuffle does not keep row order. The shuffle has as
    many partitions as there are batches, up to Ray's default width; a partition is one block, handed
    whole to one actor call, and may hold several batches (hashing puts some together).
    """
    import ray

    max_partitions = ray.data.DataContext.get_current().default_hash_shuffle_parallelism
    num_partitions = max(1, min(len(plan.batches), max_partitions))
    documents = ray.data.from_items([
        {"doc_id": d.id, "text": d.text, "metadata": json.dumps(d.metadata)}
        for d in corpus.values() if d.id in plan.batches_of_document
    ], override_num_blocks=num_partitions)
    questions = ray.data.from_items([
        {"batch": b, "kind": "question", "record": json.dumps({**question_to_json(q), "position": i})}
        for b, batch in enumerate(plan.batches) for i, q in enumerate(batch)
    ], override_num_blocks=num_partitions)
    routed = documents.flat_map(partial(_to_batches, plan.batches_of_document))
    return routed.union(questions).groupby("batch", num_partitions=num_partitions)


def _to_batches(batches_of_document: dict[str, list[int]], row: dict[str, Any]) -> list[dict[str, Any]]:
    """One documents row -> one co-grouped row per batch that needs the document."""
    record = json.dumps({"id": row["doc_id"], "text": row["text"], "metadata": json.loads(row["metadata"])})
    return [{"batch": b, "kind": "document", "record": record} for b in batches_of_document[row["doc_id"]]]


def ray_batches(job: DocQAJob, options: RayOptions) -> BatchFn:
    """A `BatchFn` running `job`'s pending questions on Ray Data (see module docstring)."""

    def run(pending: Sequence[QuestionRecord], corpus: dict[str, Document],
            index_dir: Path | None) -> Iterator[list[AnswerRecord | FailureRecord]]:
        ray = ensure_ray(options)
        config = job.config
        if index_dir is None and may_need_retrieval(pending, corpus, config.retrieval):
            index_dir = _build_shared_index(job, corpus, pending)
        num_gpus = options.num_gpus_per_actor
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        plan = plan_batches(pending, corpus, config.run.batch_size)
        answered = batch_groups(plan, corpus).map_groups(
            AnswerActor,
            fn_constructor_kwargs={"config": config.to_dict(),
                                   "index_dir": None if index_dir is None else str(index_dir)},
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.num_actors),
            num_gpus=num_gpus,
            num_cpus=options.num_cpus_per_actor,
        )
        for rows in answered.iter_batches(batch_size=None, batch_format="numpy"):
            yield [_record(str(kind), str(line)) for kind, line in zip(rows["kind"], rows["record"])]

    return run


def _record(kind: str, line: str) -> AnswerRecord | FailureRecord:
    data = json.loads(line)
    return AnswerRecord.from_json(data) if kind == "answer" else FailureRecord.from_json(data)


def _build_shared_index(job: DocQAJob, corpus: dict[str, Document], pending: Sequence[QuestionRecord]) -> Path:
    """Build the retrieval index once in the driver, saved beside the answers for the actors."""
    from dataclasses import replace

    from terse.pipelines.docqa.contexts import documents_to_index, open_or_build_index

    configured = job.config.retrieval.index_dir
    index_dir = Path(configured) if configured else job.paths.output.with_name(job.paths.output.stem + ".index")
    needed = documents_to_index(pending, corpus, job.config.retrieval)
    open_or_build_index(needed, replace(job.config.retrieval, index_dir=str(index_dir)))
    return index_dir
