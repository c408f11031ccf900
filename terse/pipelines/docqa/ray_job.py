"""The doc-QA job on Ray Data: questions as a dataset, answering in an actor pool that owns backends.

    driver: pending questions ─► ray.data.from_items ─► map_batches(AnswerActor, concurrency=N,
            num_gpus=G per actor) ─► iter_batches ─► the same journals as the single-process job

Each actor builds its backend, context source and compressor once and answers whole batches with the
same `BatchAnswerer` as the single-process job, so greedy answers are the same. The driver writes
every batch as it arrives, so a Ray run is resumable exactly like a local one. The retrieval index is
built (or reopened) once by the driver and saved beside the answers; actors reopen it from disk, and
the corpus travels to them once through the object store.

Needs the `ray` extra (`pip install 'terse[ray]'`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ConfigError(f"num_actors={self.num_actors} must be >= 1")
        if self.num_gpus_per_actor is not None and self.num_gpus_per_actor < 0:
            raise ConfigError(f"num_gpus_per_actor={self.num_gpus_per_actor} must be >= 0")
        if self.num_cpus_per_actor <= 0:
            raise ConfigError(f"num_cpus_per_actor={self.num_cpus_per_actor} must be > 0")


class AnswerActor:
    """A Ray Data actor: owns one backend and answers batches of questions (rows of JSON lines)."""

    def __init__(self, config: dict[str, Any], corpus: Any, index_dir: str | None) -> None:
        from terse.backend.registry import load_backend

        self.config = DocQAConfig.from_dict(config)
        self.corpus: dict[str, Document] = _resolve(corpus)
        self.index_dir = index_dir
        self.backend = load_backend(self.config.backend, **self.config.backend_options)
        self._answerer: Any = None

    def _get_answerer(self) -> Any:
        # Built on the first batch, not in __init__: Ray calls __init__ and __call__ on different
        # threads, and the index's SQLite store may only be used by the thread that opened it.
        if self._answerer is None:
            from terse.pipelines.docqa.answerer import BatchAnswerer
            from terse.pipelines.docqa.job import open_index

            use_index = self.index_dir is not None and self.config.retrieval.enabled
            retriever = open_index(Path(self.index_dir)) if use_index and self.index_dir else None
            self._answerer = BatchAnswerer(self.config, self.backend, self.corpus, retriever)
        return self._answerer

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        questions = [question_from_json(json.loads(line)) for line in batch["question"]]
        records = self._get_answerer().answer(questions)
        return {
            "kind": ["answer" if isinstance(r, AnswerRecord) else "failure" for r in records],
            "record": [json.dumps(r.to_json()) for r in records],
        }


def _resolve(corpus: Any) -> dict[str, Document]:
    import ray

    data = ray.get(corpus) if isinstance(corpus, ray.ObjectRef) else corpus
    return {doc_id: Document(doc_id, text, meta) for doc_id, (text, meta) in data.items()}


def question_to_json(q: QuestionRecord) -> dict[str, Any]:
    return {"id": q.id, "question": q.question, "doc_ids": list(q.doc_ids), "answer": q.answer,
            "items": list(q.items), "line_no": q.line_no}


def question_from_json(data: dict[str, Any]) -> QuestionRecord:
    return QuestionRecord(data["id"], data["question"], tuple(data["doc_ids"]), data["answer"],
                          tuple(data["items"]), data["line_no"])


def ensure_ray(options: RayOptions) -> Any:
    """Connect to (or start) the cluster unless this process already did.

    A local cluster gets at least two logical CPUs more than the actors reserve: Ray Data's read and
    output tasks need CPU slots beside the actor pool, and without them a run on a small machine stalls.
    """
    import ray

    if not ray.is_initialized():
        if options.address is None:
            reserved = math.ceil(options.num_actors * options.num_cpus_per_actor)
            num_cpus = max(os.cpu_count() or 1, reserved + 2)
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
    return ray


def ray_batches(job: DocQAJob, options: RayOptions) -> BatchFn:
    """A `BatchFn` running `job`'s pending questions on Ray Data (see module docstring)."""

    def run(pending: Sequence[QuestionRecord], corpus: dict[str, Document],
            index_dir: Path | None) -> Iterator[list[AnswerRecord | FailureRecord]]:
        ray = ensure_ray(options)
        config = job.config
        if index_dir is None and may_need_retrieval(pending, corpus, config.retrieval):
            index_dir = _build_shared_index(job, corpus, pending)
        corpus_ref = ray.put({d.id: (d.text, d.metadata) for d in corpus.values()})
        num_gpus = options.num_gpus_per_actor
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        size = config.run.batch_size
        dataset = ray.data.from_items(
            [{"question": json.dumps(question_to_json(q))} for q in pending],
            override_num_blocks=max(1, -(-len(pending) // size)),
        )
        answered = dataset.map_batches(
            AnswerActor,
            fn_constructor_kwargs={"config": config.to_dict(), "corpus": corpus_ref,
                                   "index_dir": None if index_dir is None else str(index_dir)},
            batch_size=size,
            concurrency=options.num_actors,
            num_gpus=num_gpus,
            num_cpus=options.num_cpus_per_actor,
        )
        for batch in answered.iter_batches(batch_size=None, batch_format="numpy"):
            yield [_record(str(kind), str(line)) for kind, line in zip(batch["kind"], batch["record"])]

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
