"""The bundled demo sample: a dozen short test-split documents and ~20 questions answerable from them.

`write_sample(directory)` regenerates exactly what ships in `terse/pipelines/sample_data/`:
`documents/<doc_id>.md` (one file per document; the doc-QA loader names each by its file name) and
`questions.jsonl` ({id, question, answer, kind, gold_doc_ids, items for lists}). Questions carry no
`doc_ids`, so a job retrieves over the whole sample corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from terse.synth.questions import Question, world_questions
from terse.synth.render import Document, render_documents
from terse.synth.world import build_world

SAMPLE_WORLD = 0
"""Test-split world the sample comes from."""


def sample_set(num_companies: int = 4) -> tuple[list[Document], list[Question]]:
    """Documents of `num_companies` companies, their CEOs and products' makers' staff, one city, one
    article; the questions whose gold documents all lie in that set (at most 8 of each kind)."""
    world = build_world(2_000_000 + SAMPLE_WORLD, "test")
    docs = render_documents(world)
    companies = sorted(world.companies)[:num_companies]
    people = [world.companies[c].ceo for c in companies]
    products = [world.companies[c].products[0] for c in companies]
    city = world.companies[companies[0]].city
    wanted = {("company", c) for c in companies} | {("person", p) for p in people}
    wanted |= {("product", p) for p in products} | {("city", city)}
    chosen = [d for d in docs if (d.kind, d.title.removeprefix("The ")) in wanted]
    chosen.append(next(d for d in docs if d.kind == "news"))
    ids = {d.doc_id for d in chosen}
    rng = random.Random("sample")
    counts = {"single": 0, "multi": 0, "list": 0}
    questions: list[Question] = []
    answers: set[str] = set()
    for q in world_questions(world, docs, 400, rng):
        if set(q.doc_ids) <= ids and counts[q.kind] < 8 and q.answer not in answers:
            answers.add(q.answer)
            counts[q.kind] += 1
            questions.append(q)
    return chosen, questions


def write_sample(directory: Path) -> None:
    """Write the sample documents and questions under `directory` (overwrites)."""
    docs, questions = sample_set()
    (directory / "documents").mkdir(parents=True, exist_ok=True)
    for d in docs:
        (directory / "documents" / f"{d.doc_id}.md").write_text(d.text + "\n", encoding="utf-8")
    with (directory / "questions.jsonl").open("w", encoding="utf-8") as f:
        for q in questions:
            record: dict[str, object] = {
                "id": q.qid,
                "question": q.question,
                "answer": q.answer,
                "kind": q.kind,
                "gold_doc_ids": [f"{i}.md" for i in q.doc_ids],
            }
            if q.items:
                record["items"] = list(q.items)
            f.write(json.dumps(record) + "\n")
