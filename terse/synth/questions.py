"""Questions with gold answers over a rendered world: single-hop, multi-hop, list and needle.

Each `Question` names its gold documents (`doc_ids`), the exact gold `answer` string, and for
multi-hop questions the two-step plan (`steps`) that the DAG format trains on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from terse.synth.render import Document, filler_sentences
from terse.synth.world import World

QuestionKind = Literal["single", "multi", "list", "needle"]
QUESTION_KINDS: tuple[QuestionKind, ...] = ("single", "multi", "list", "needle")


@dataclass(frozen=True)
class PlanStepSpec:
    """One sub-question of a multi-hop question: text may hold {Q1}; `answer` is its gold answer."""

    question: str
    answer: str
    depends_on: tuple[int, ...] = ()
    """1-based indices of earlier steps whose answers the text refers to."""


@dataclass(frozen=True)
class Question:
    qid: str
    question: str
    doc_ids: tuple[str, ...]
    answer: str
    kind: QuestionKind
    items: tuple[str, ...] = ()
    """List questions: the answer's items in order (`answer` is them joined by ", ")."""
    steps: tuple[PlanStepSpec, ...] = ()
    """Multi-hop questions: the sub-questions in dependency order."""
    context_doc_ids: tuple[str, ...] = field(default=(), compare=False)
    """The benchmark's full context: gold documents among distractors, in prompt order."""

    def to_json(self) -> dict[str, object]:
        record: dict[str, object] = {
            "id": self.qid,
            "question": self.question,
            "doc_ids": list(self.doc_ids),
            "answer": self.answer,
            "kind": self.kind,
        }
        if self.items:
            record["items"] = list(self.items)
        if self.steps:
            record["steps"] = [
                {"question": s.question, "answer": s.answer, "depends_on": list(s.depends_on)} for s in self.steps
            ]
        if self.context_doc_ids:
            record["context_doc_ids"] = list(self.context_doc_ids)
        return record


def _doc_index(docs: list[Document]) -> dict[tuple[str, str], str]:
    """(kind, subject name) -> doc id, from the documents' titles."""
    index = {}
    for d in docs:
        index[(d.kind, d.title.removeprefix("The "))] = d.doc_id
    return index


def single_hop(world: World, docs: list[Document], rng: random.Random) -> tuple[str, str, str, str]:
    """(question, answer, doc kind, subject) for one random single-hop fact."""
    index_kind = rng.choice(["person", "company", "product"])
    if index_kind == "person":
        p = world.people[rng.choice(sorted(world.people))]
        q, a = rng.choice([
            (f"Which company does {p.name} work for?", p.employer),
            (f"In which city does {p.name} live?", p.city),
            (f"In which year was {p.name} born?", str(p.birth_year)),
        ])
        return q, a, "person", p.name
    if index_kind == "company":
        c = world.companies[rng.choice(sorted(world.companies))]
        q, a = rng.choice([
            (f"In which city is {c.name} based?", c.city),
            (f"In which year was {c.name} founded?", str(c.founded_year)),
            (f"Who is the CEO of {c.name}?", c.ceo),
        ])
        return q, a, "company", c.name
    pr = world.products[rng.choice(sorted(world.products))]
    q, a = rng.choice([
        (f"Which company makes the {pr.name}?", pr.maker),
        (f"In which year was the {pr.name} launched?", str(pr.launch_year)),
    ])
    return q, a, "product", pr.name


def multi_hop(world: World, rng: random.Random) -> tuple[str, str, list[tuple[str, str]], tuple[PlanStepSpec, ...]]:
    """(question, answer, gold (kind, subject) pairs, plan) for one two-fact question."""
    if rng.random() < 0.5:
        p = world.people[rng.choice(sorted(world.people))]
        c = world.companies[p.employer]
        step1 = PlanStepSpec(f"Which company does {p.name} work for?", c.name)
        q, a, sub = rng.choice([
            (f"In which city is the company {p.name} works for based?", c.city, "In which city is {Q1} based?"),
            (f"In which year was the company {p.name} works for founded?", str(c.founded_year), "In which year was {Q1} founded?"),
            (f"Who is the CEO of the company {p.name} works for?", c.ceo, "Who is the CEO of {Q1}?"),
        ])
        return q, a, [("person", p.name), ("company", c.name)], (step1, PlanStepSpec(sub, a, (1,)))
    pr = world.products[rng.choice(sorted(world.products))]
    c = world.companies[pr.maker]
    step1 = PlanStepSpec(f"Which company makes the {pr.name}?", c.name)
    q, a, sub = rng.choice([
        (f"In which city is the company that makes the {pr.name} based?", c.city, "In which city is {Q1} based?"),
        (f"Who is the CEO of the company that makes the {pr.name}?", c.ceo, "Who is the CEO of {Q1}?"),
        (f"In which year was the company that makes the {pr.name} founded?", str(c.founded_year), "In which year was {Q1} founded?"),
    ])
    return q, a, [("product", pr.name), ("company", c.name)], (step1, PlanStepSpec(sub, a, (1,)))


def world_questions(world: World, docs: list[Document], num_per_kind: int, rng: random.Random) -> list[Question]:
    """`num_per_kind` single-hop, multi-hop and list questions (duplicates skipped) over one world."""
    index = _doc_index(docs)
    out: list[Question] = []
    seen: set[str] = set()

    def add(q: Question) -> None:
        if q.question not in seen:
            seen.add(q.question)
            out.append(q)

    prefix = f"{world.split[:2]}{world.seed}"
    for i in range(num_per_kind):
        q, a, kind, subject = single_hop(world, docs, rng)
        add(Question(f"{prefix}-s{i}", q, (index[(kind, subject)],), a, "single"))
        mq, ma, gold, steps = multi_hop(world, rng)
        add(Question(f"{prefix}-m{i}", mq, tuple(index[g] for g in gold), ma, "multi", steps=steps))
        c = world.companies[rng.choice(sorted(world.companies))]
        lq = rng.choice([f"Which products does {c.name} make?", f"What products are made by {c.name}?"])
        add(Question(f"{prefix}-l{i}", lq, (index[("company", c.name)],), ", ".join(c.products), "list", items=c.products))
    return out


NEEDLE_TEMPLATES = (
    "The passcode of the {name} archive is {code}.",
    "Remember this: the {name} archive opens with the passcode {code}.",
)


def needle_document(
    world: World, rng: random.Random, *, length_chars: int, depth: float, doc_id: str
) -> tuple[Document, Question]:
    """A haystack of filler prose about `length_chars` long with one planted passcode at `depth` in [0, 1]."""
    name = rng.choice(sorted(world.cities)) + " " + rng.choice(["municipal", "river", "harbour", "old town"])
    code = str(rng.randint(1000, 99999))
    needle = rng.choice(NEEDLE_TEMPLATES).format(name=name, code=code)
    sentences: list[str] = []
    while sum(len(s) + 1 for s in sentences) < length_chars:
        sentences += filler_sentences(rng, 1)
    at = round(depth * len(sentences))
    sentences.insert(at, needle)
    text = "Notes from the city records office\n" + " ".join(sentences)
    doc = Document(doc_id, "Notes from the city records office", text, "haystack")
    question = Question(
        f"{doc_id}-q", f"What is the passcode of the {name} archive?", (doc_id,), code, "needle"
    )
    return doc, question


def build_context(
    question: Question, docs: list[Document], rng: random.Random, *, target_chars: int
) -> tuple[str, ...]:
    """Gold documents among random distractors from the same world, about `target_chars` long, shuffled."""
    return tuple(context_doc_ids(question.doc_ids, docs, rng, target_chars))


def context_doc_ids(
    gold_ids: Sequence[str], docs: Sequence[Document], rng: random.Random, target_chars: int
) -> list[str]:
    """The distinct gold ids plus random non-haystack distractors until about `target_chars`, shuffled."""
    by_id = {d.doc_id: d for d in docs}
    chosen = list(dict.fromkeys(gold_ids))
    total = sum(len(by_id[i].text) for i in chosen)
    others = [d.doc_id for d in docs if d.doc_id not in chosen and d.kind != "haystack"]
    rng.shuffle(others)
    for doc_id in others:
        if total >= target_chars:
            break
        chosen.append(doc_id)
        total += len(by_id[doc_id].text)
    rng.shuffle(chosen)
    return chosen
