"""Sample inputs for the demo, tests and benchmark: the bundled sample data, or a generated set.

`write_synthetic(directory, ...)` writes `documents.jsonl` and `questions.jsonl` from terse.synth: each
question names its benchmark context (gold documents among distractors) as `doc_ids`, so the naive
job pastes that context and terse's pipeline retrieves and compresses within it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import terse

SAMPLE_DATA_DIR = Path(terse.__file__).parent / "pipelines" / "sample_data"
"""Where the bundled sample data lives (documents + questions.jsonl), when this install has it."""

REFERENCE_MODEL_DIR = Path(terse.__file__).parent / "models" / "reference"
"""Where the shipped reference model lives (its tokenizer is there even without the weights)."""


def reference_model_dir() -> Path | None:
    """The shipped reference model's directory, or None when this installation has none."""
    from terse.errors import ModelLoadError
    from terse.models import reference_model_path

    try:
        return reference_model_path()
    except ModelLoadError:
        return None


def bundled_sample() -> tuple[Path, Path] | None:
    """(documents path, questions file) of the bundled sample data, or None when it is not installed."""
    questions = SAMPLE_DATA_DIR / "questions.jsonl"
    if not questions.is_file():
        return None
    for name in ("documents", "docs", "documents.jsonl"):
        if (SAMPLE_DATA_DIR / name).exists():
            return SAMPLE_DATA_DIR / name, questions
    return None


def write_synthetic(
    directory: Path,
    *,
    num_worlds: int = 1,
    questions_per_kind: int = 4,
    context_tokens: int = 1024,
    kinds: Sequence[str] = ("single", "multi", "list"),
    split: str = "test",
) -> tuple[Path, Path]:
    """Generate a seeded doc-QA set with terse.synth; returns (documents.jsonl, questions.jsonl)."""
    from terse.synth.dataset import SplitConfig, build_split

    config = SplitConfig(num_worlds=num_worlds, questions_per_kind=questions_per_kind, needle_lengths=(),
                         needle_depths=(), context_tokens=context_tokens)
    data = build_split(split, config)  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    docs_path, questions_path = directory / "documents.jsonl", directory / "questions.jsonl"
    with docs_path.open("w", encoding="utf-8") as f:
        for d in data.documents:
            f.write(json.dumps({"id": d.doc_id, "text": d.text, "title": d.title}) + "\n")
    with questions_path.open("w", encoding="utf-8") as f:
        for q in data.questions:
            if q.kind not in kinds:
                continue
            record: dict[str, object] = {"id": q.qid, "question": q.question,
                                         "doc_ids": list(q.context_doc_ids or q.doc_ids), "answer": q.answer}
            if q.items:
                record["items"] = list(q.items)
            f.write(json.dumps(record) + "\n")
    return docs_path, questions_path
