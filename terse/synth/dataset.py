"""Splits of the synthetic doc-QA benchmark and their JSONL export.

A split is a list of worlds; world seeds and entity names are disjoint across splits (names by the
hash partition in `names.py`, seeds because every random stream is keyed by the split name too).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from terse.errors import ConfigError
from terse.synth.names import SPLITS, Split
from terse.synth.questions import Question, build_context, needle_document, world_questions
from terse.synth.render import Document, render_documents
from terse.synth.world import World, WorldConfig, build_world

CHARS_PER_TOKEN = 2.8
"""Characters per token of the reference tokenizer on generated text (it gives every space its own
token: measured 2.76; 4.27 for a tokenizer trained without `isolate_spaces`)."""


@dataclass(frozen=True)
class SplitConfig:
    """How much of a split to generate and how long its contexts are."""

    num_worlds: int = 4
    """Independent worlds (each its own entities and documents)."""
    questions_per_kind: int = 10
    """Single-hop, multi-hop and list questions drawn per world (each kind; duplicates dropped)."""
    needle_lengths: tuple[int, ...] = (512, 1024, 2048, 4096)
    """Haystack lengths in (approximate) tokens; one needle question per length x depth x world."""
    needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Relative positions of the planted fact in the haystack, each in [0, 1]."""
    context_tokens: int = 2048
    """Approximate length of a question's full context (gold documents among distractors)."""
    chars_per_token: float = CHARS_PER_TOKEN
    """Characters per token used to turn token targets into text lengths."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """Size of each world."""

    def __post_init__(self) -> None:
        if self.num_worlds < 1:
            raise ConfigError(f"num_worlds={self.num_worlds} must be >= 1")
        if self.questions_per_kind < 0:
            raise ConfigError(f"questions_per_kind={self.questions_per_kind} must be >= 0")
        if any(not 0.0 <= d <= 1.0 for d in self.needle_depths):
            raise ConfigError(f"needle_depths={self.needle_depths} must all lie in [0, 1]")
        if any(n < 64 for n in self.needle_lengths):
            raise ConfigError(f"needle_lengths={self.needle_lengths} must all be >= 64 tokens")
        if self.context_tokens < 64 or self.chars_per_token <= 0:
            raise ConfigError(
                f"context_tokens={self.context_tokens} must be >= 64 and chars_per_token="
                f"{self.chars_per_token} > 0"
            )


@dataclass(frozen=True)
class SplitData:
    """One generated split: all documents and all questions (with their benchmark contexts)."""

    split: Split
    documents: list[Document]
    questions: list[Question]
    worlds: list[World]

    def document(self, doc_id: str) -> Document:
        for d in self.documents:
            if d.doc_id == doc_id:
                return d
        raise KeyError(doc_id)


_SEED_BASE = {"train": 0, "validation": 1_000_000, "test": 2_000_000}


def build_split(split: Split, config: SplitConfig | None = None, *, first_world: int = 0) -> SplitData:
    """Generate `config.num_worlds` worlds of `split` starting at world index `first_world`.

    Deterministic: the same arguments give identical documents and questions in any process.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {SPLITS}")
    config = config or SplitConfig()
    documents: list[Document] = []
    questions: list[Question] = []
    worlds: list[World] = []
    for index in range(first_world, first_world + config.num_worlds):
        world = build_world(_SEED_BASE[split] + index, split, config.world)
        docs, qs = world_split(world, config)
        worlds.append(world)
        documents += docs
        questions += qs
    return SplitData(split, documents, questions, worlds)


def world_split(world: World, config: SplitConfig) -> tuple[list[Document], list[Question]]:
    """Documents and questions (contexts attached) of one world."""
    rng = random.Random(f"questions:{world.split}:{world.seed}")
    docs = render_documents(world)
    target_chars = round(config.context_tokens * config.chars_per_token)
    questions = [
        _with_context(q, build_context(q, docs, rng, target_chars=target_chars))
        for q in world_questions(world, docs, config.questions_per_kind, rng)
    ]
    prefix = f"{world.split[:2]}{world.seed}"
    for length in config.needle_lengths:
        for depth in config.needle_depths:
            doc, q = needle_document(
                world,
                rng,
                length_chars=round(length * config.chars_per_token),
                depth=depth,
                doc_id=f"{prefix}-n{length}-{round(depth * 100)}",
            )
            docs.append(doc)
            questions.append(_with_context(q, q.doc_ids))
    return docs, questions


def _with_context(q: Question, context_doc_ids: tuple[str, ...]) -> Question:
    return Question(q.qid, q.question, q.doc_ids, q.answer, q.kind, q.items, q.steps, context_doc_ids)


def write_jsonl(data: SplitData, directory: Path) -> tuple[Path, Path]:
    """Write `documents.jsonl` ({id, title, text, kind}) and `questions.jsonl` into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    docs_path, questions_path = directory / "documents.jsonl", directory / "questions.jsonl"
    with docs_path.open("w", encoding="utf-8") as f:
        for d in data.documents:
            f.write(json.dumps({"id": d.doc_id, "title": d.title, "text": d.text, "kind": d.kind}) + "\n")
    with questions_path.open("w", encoding="utf-8") as f:
        for q in data.questions:
            f.write(json.dumps(q.to_json()) + "\n")
    return docs_path, questions_path
