"""The synthetic world: determinism, gold answers in gold documents, disjoint splits, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from terse.answer_match import contains_all, exact_match, list_items
from terse.errors import ConfigError
from terse.synth import SplitConfig, WorldConfig, build_split, build_world, write_jsonl
from terse.synth.names import split_of

SMALL = SplitConfig(num_worlds=2, questions_per_kind=6, needle_lengths=(128, 512), needle_depths=(0.0, 0.5, 1.0))


def _dump(split: str, first_world: int = 0) -> list[str]:
    data = build_split(split, SMALL, first_world=first_world)  # type: ignore[arg-type]
    docs = [json.dumps([d.doc_id, d.title, d.text, d.kind]) for d in data.documents]
    return docs + [json.dumps(q.to_json(), sort_keys=True) for q in data.questions]


def test_same_seed_same_world_and_other_seed_differs() -> None:
    assert _dump("test") == _dump("test")
    assert _dump("test") != _dump("test", first_world=5)
    assert build_world(7, "train") == build_world(7, "train")


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_every_gold_answer_is_in_its_gold_documents(split: str) -> None:
    data = build_split(split, SMALL)  # type: ignore[arg-type]
    kinds = set()
    for q in data.questions:
        kinds.add(q.kind)
        gold = "\n".join(data.document(i).text for i in q.doc_ids)
        assert q.doc_ids and set(q.doc_ids) <= set(q.context_doc_ids), q.qid
        if q.kind == "list":
            assert len(q.items) >= 2 and contains_all(gold, q.items) and q.answer == ", ".join(q.items)
        else:
            assert q.answer in gold, (q.question, q.answer)
        if q.kind == "multi":
            assert len(q.doc_ids) == 2 and len(q.steps) == 2
            assert all(step.answer in gold for step in q.steps)
            assert q.steps[1].answer == q.answer and "{Q1}" in q.steps[1].question
    assert kinds == {"single", "multi", "list", "needle"}


def test_needles_sit_at_their_depth_in_haystacks_of_growing_length() -> None:
    data = build_split("test", SMALL)
    needles = [q for q in data.questions if q.kind == "needle"]
    assert len(needles) == SMALL.num_worlds * 2 * 3
    lengths = {}
    for q in needles:
        text = data.document(q.doc_ids[0]).text
        position = text.index(q.answer) / len(text)
        depth = int(q.doc_ids[0].rsplit("-", 1)[1]) / 100
        assert abs(position - depth) < 0.2, (q.qid, position)
        lengths.setdefault(q.doc_ids[0].split("-n")[1].split("-")[0], []).append(len(text))
    assert min(lengths["512"]) > 2.5 * max(lengths["128"])


def test_splits_share_no_entity_names() -> None:
    names = {}
    surnames = {}
    for split in ("train", "validation", "test"):
        worlds = [build_world(i, split) for i in range(6)]  # type: ignore[arg-type]
        names[split] = set().union(*(w.entity_names() for w in worlds))
        surnames[split] = {p.split()[-1] for w in worlds for p in w.people}
        assert all(split_of(s) == split for s in surnames[split])
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not names[a] & names[b], (a, b, sorted(names[a] & names[b])[:5])
        assert not surnames[a] & surnames[b]


def test_world_relations_are_consistent() -> None:
    world = build_world(3, "validation", WorldConfig(num_companies=6, num_people=12))
    for company in world.companies.values():
        assert world.people[company.ceo].employer == company.name
        assert company.city in world.cities
        assert all(world.products[p].maker == company.name for p in company.products)
    assert {p.employer for p in world.people.values()} == set(world.companies)


def test_jsonl_export_round_trips(tmp_path: Path) -> None:
    data = build_split("test", SMALL)
    docs_path, questions_path = write_jsonl(data, tmp_path / "out")
    docs = [json.loads(line) for line in docs_path.read_text().splitlines()]
    questions = [json.loads(line) for line in questions_path.read_text().splitlines()]
    assert len(docs) == len(data.documents) and len(questions) == len(data.questions)
    assert {"id", "question", "doc_ids", "answer", "kind"} <= set(questions[0])
    doc_ids = {d["id"] for d in docs}
    assert len(doc_ids) == len(docs)
    assert all(set(q["doc_ids"]) <= doc_ids for q in questions)


@pytest.mark.parametrize(
    "make",
    [
        lambda: WorldConfig(num_cities=1),
        lambda: WorldConfig(num_people=3, num_companies=5),
        lambda: WorldConfig(products_per_company=(1, 3)),
        lambda: SplitConfig(num_worlds=0),
        lambda: SplitConfig(needle_depths=(1.5,)),
    ],
)
def test_bad_configs_raise_config_error(make: object) -> None:
    with pytest.raises(ConfigError):
        make()  # type: ignore[operator]
    with pytest.raises(ConfigError, match="split"):
        build_split("dev")  # type: ignore[arg-type]


def test_exact_match_rules() -> None:
    assert exact_match(" Pstad. ", "Pstad")
    assert not exact_match("Pstad Labs", "Pstad")
    assert exact_match("B 2, A 1", "A 1, B 2", items=("A 1", "B 2"))
    assert exact_match("1. A 1\n2. B 2", "A 1, B 2", items=("A 1", "B 2"))
    assert not exact_match("A 1", "A 1, B 2", items=("A 1", "B 2"))
    assert list_items("x, y and z") == ["x", "y", "z"]
