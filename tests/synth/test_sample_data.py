"""The bundled demo sample is exactly what terse.synth regenerates, and its answers are in its documents."""

from __future__ import annotations

import json
from pathlib import Path

from terse.synth.sample import write_sample

BUNDLED = Path(__file__).resolve().parents[2] / "terse" / "pipelines" / "sample_data"


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*")) if p.is_file()}


def test_bundled_sample_matches_regeneration(tmp_path: Path) -> None:
    write_sample(tmp_path)
    assert _files(tmp_path) == _files(BUNDLED)


def test_sample_questions_are_answerable_from_the_sample_documents() -> None:
    questions = [json.loads(line) for line in (BUNDLED / "questions.jsonl").read_text().splitlines()]
    docs = _files(BUNDLED / "documents")
    assert 8 <= len(docs) <= 15 and 12 <= len(questions) <= 25
    assert {q["kind"] for q in questions} == {"single", "multi", "list"}
    for q in questions:
        gold = "\n".join(docs[d] for d in q["gold_doc_ids"])
        for part in q.get("items") or [q["answer"]]:
            assert part in gold, q
