"""Value types of a doc-QA job: questions in, passages in between, answers out (all JSON round-trip)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class QuestionRecord:
    """One line of the questions file."""

    id: str
    """Unique id; answers carry it, and a rerun skips ids already answered."""
    question: str
    """The question text."""
    doc_ids: tuple[str, ...] = ()
    """Documents the question is about; empty means every document of the corpus."""
    answer: str | None = None
    """Gold answer, when known (accuracy is computed from it)."""
    items: tuple[str, ...] = ()
    """Gold list items for list questions (matched as a set)."""
    line_no: int = field(default=0, compare=False)
    """Line of the questions file it came from (for error messages)."""


@dataclass(frozen=True)
class Passage:
    """A piece of one document handed to the prompt; `doc.text[char_start:char_end] == text`."""

    doc_id: str
    char_start: int
    char_end: int
    text: str
    label: str = ""
    """How the prompt names the passage: the doc id for a whole document, "doc_id#n" for its chunk n
    (the layout the reference model is trained on); empty means the doc id."""

    @property
    def name(self) -> str:
        return self.label or self.doc_id


@dataclass(frozen=True)
class Source:
    """Where a piece of the prompt came from: a document id and a character range in it."""

    doc_id: str
    char_start: int
    char_end: int

    def to_json(self) -> dict[str, Any]:
        return {"doc_id": self.doc_id, "char_start": self.char_start, "char_end": self.char_end}


@dataclass(frozen=True)
class QAUsage:
    """Token and time accounting of one answered question."""

    original_prompt_tokens: int
    """Tokens of the naive prompt: every relevant document pasted whole, nothing compressed."""
    prompt_tokens: int
    """Tokens actually sent (summed over every call when the answer was organized)."""
    cached_tokens: int
    """Prompt tokens whose prefill the backend reused from its prefix cache."""
    completion_tokens: int
    """Tokens generated."""
    latency_s: float
    """Seconds from submitting the question's first request until its answer was complete."""

    def to_json(self) -> dict[str, Any]:
        return {
            "original_prompt_tokens": self.original_prompt_tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_s": round(self.latency_s, 4),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QAUsage:
        return cls(
            int(data["original_prompt_tokens"]),
            int(data["prompt_tokens"]),
            int(data["cached_tokens"]),
            int(data["completion_tokens"]),
            float(data["latency_s"]),
        )


@dataclass(frozen=True)
class AnswerRecord:
    """One line of the answers file."""

    id: str
    answer: str
    sources: tuple[Source, ...]
    usage: QAUsage
    correct: bool | None = None
    """Normalized exact match against the gold answer; None without one."""

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": self.id,
            "answer": self.answer,
            "sources": [s.to_json() for s in self.sources],
            "usage": self.usage.to_json(),
        }
        if self.correct is not None:
            record["correct"] = self.correct
        return record

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnswerRecord:
        return cls(
            id=str(data["id"]),
            answer=str(data["answer"]),
            sources=tuple(Source(str(s["doc_id"]), int(s["char_start"]), int(s["char_end"]))
                          for s in data.get("sources", [])),
            usage=QAUsage.from_json(data["usage"]),
            correct=data.get("correct"),
        )


@dataclass(frozen=True)
class FailureRecord:
    """One line of the failures file: a question that could not be answered in this attempt."""

    id: str
    error_type: str
    """Class name of the error (e.g. "BackendUnavailableError", "InvalidRequestError")."""
    message: str
    backend_unavailable: bool = False
    """True when the backend could not be reached (counts toward stopping the job early)."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "error_type": self.error_type, "error": self.message,
                "backend_unavailable": self.backend_unavailable}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FailureRecord:
        return cls(str(data["id"]), str(data.get("error_type", "")), str(data.get("error", "")),
                   bool(data.get("backend_unavailable", False)))
