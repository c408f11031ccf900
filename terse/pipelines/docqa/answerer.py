"""`BatchAnswerer`: questions in, answer and failure records out, for one batch.

It owns the backend-facing parts of a job (context source, compressor, prompt builder, dispatch), so the
same object answers batches in the single-process job and inside each Ray actor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from terse.answer_match import exact_match
from terse.backend.base import Backend
from terse.pipelines.docqa.config import DocQAConfig
from terse.pipelines.docqa.contexts import build_context_source, documents_to_index, open_or_build_index
from terse.pipelines.docqa.dispatch import BatchDispatch, Generated, Outcome, Started, build_dispatch, failure
from terse.pipelines.docqa.prepare import NaivePromptCounter, PreparedQuestion, Preparer, schedule
from terse.pipelines.docqa.prepare_pool import PreparePool
from terse.pipelines.docqa.records import AnswerRecord, FailureRecord, QAUsage, QuestionRecord
from terse.retrieval.types import Document


def is_correct(record: QuestionRecord, answer: str) -> bool | None:
    """Normalized exact match against the gold answer (set match for list items); None without gold."""
    if record.answer is None and not record.items:
        return None
    return exact_match(answer, record.answer or "", record.items)


def answer_record(generated: Generated) -> AnswerRecord:
    p = generated.prepared
    usage = QAUsage(
        original_prompt_tokens=p.original_prompt_tokens,
        prompt_tokens=generated.usage.prompt_tokens,
        cached_tokens=generated.usage.cached_prompt_tokens,
        completion_tokens=generated.usage.completion_tokens,
        latency_s=generated.latency_s,
    )
    return AnswerRecord(p.record.id, generated.text, p.sources, usage, is_correct(p.record, generated.text))


class BatchAnswerer:
    """Prepares and answers batches of questions on one backend (see module docstring)."""

    def __init__(
        self,
        config: DocQAConfig,
        backend: Backend,
        corpus: Mapping[str, Document],
        retriever: Any | None = None,
        questions: Sequence[QuestionRecord] = (),
    ) -> None:
        """`retriever` reuses an opened index; otherwise one is built, when a question first needs it,
        over the documents `questions` need (`documents_to_index`)."""

        def make_retriever() -> Any:
            if retriever is not None:
                return retriever
            return open_or_build_index(documents_to_index(questions, corpus, config.retrieval), config.retrieval)

        naive = NaivePromptCounter(backend, corpus)
        source = build_context_source(corpus, config.retrieval, naive.documents_part, make_retriever)
        self.preparer = Preparer(backend, corpus, source, config.compression, naive)
        self.prepare_workers = config.run.prepare_workers
        self.dispatch = build_dispatch(backend, config.backend, config.generation, config.run, config.organize)

    def answer(self, batch: Sequence[QuestionRecord]) -> list[AnswerRecord | FailureRecord]:
        """One record per question (order: prompts sharing documents together, failures first)."""
        return self.generate(batch, self.prepare(batch))

    def prepare(self, batch: Sequence[QuestionRecord], pool: PreparePool | None = None
                ) -> list[PreparedQuestion | Exception]:
        """The batch's prompts (an exception in a failed question's place); compressed on `pool`'s
        worker processes when given. Safe to run on another thread while `generate` runs."""
        return self.preparer.prepare_all(batch, self.prepare_workers, pool)

    def generate(self, batch: Sequence[QuestionRecord], items: Sequence[PreparedQuestion | Exception]
                 ) -> list[AnswerRecord | FailureRecord]:
        """Answer the prepared questions of `batch` (`items` from `prepare`, in the same order)."""
        failed, prepared = self._split(batch, items)
        outcomes: list[Outcome] = self.dispatch.run(schedule(prepared)) if prepared else []
        return failed + [answer_record(o) if isinstance(o, Generated) else o for o in outcomes]

    @property
    def submits_ahead(self) -> bool:
        """Whether `start` / `finish` can keep a batch generating while the next one is prepared."""
        return isinstance(self.dispatch, BatchDispatch)

    def start(self, batch: Sequence[QuestionRecord], items: Sequence[PreparedQuestion | Exception]) -> PendingBatch:
        """Submit the prepared questions of `batch` and return at once (`submits_ahead` dispatch only);
        `finish` collects the records, the same as `generate` returns."""
        assert isinstance(self.dispatch, BatchDispatch)
        failed, prepared = self._split(batch, items)
        return PendingBatch(failed, self.dispatch.start(schedule(prepared)) if prepared else [])

    def finish(self, pending: PendingBatch) -> list[AnswerRecord | FailureRecord]:
        assert isinstance(self.dispatch, BatchDispatch)
        outcomes = self.dispatch.finish(pending.started)
        return pending.failed + [answer_record(o) if isinstance(o, Generated) else o for o in outcomes]

    def cancel(self, pending: PendingBatch) -> None:
        """Cancel a started batch whose answers nobody will collect."""
        BatchDispatch.cancel(pending.started)

    @staticmethod
    def _split(batch: Sequence[QuestionRecord], items: Sequence[PreparedQuestion | Exception]
               ) -> tuple[list[AnswerRecord | FailureRecord], list[PreparedQuestion]]:
        prepared: list[PreparedQuestion] = []
        failed: list[AnswerRecord | FailureRecord] = []
        for question, item in zip(batch, items):
            if isinstance(item, Exception):  # a question that cannot be prepared fails alone
                failed.append(failure(question.id, item))
            else:
                prepared.append(item)
        return failed, prepared


@dataclass(frozen=True)
class PendingBatch:
    """A batch `BatchAnswerer.start` submitted: the questions that failed to prepare and the rest in flight."""

    failed: list[AnswerRecord | FailureRecord]
    started: list[Started]
