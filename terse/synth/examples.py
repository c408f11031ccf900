"""Training examples for the reference model, rendered in the shared prompt formats.

Every example is a chat prompt (system + user turn, rendered with the reference chat template, ending
in "<|assistant|>\\n") and the assistant's completion; the model is trained on the completion only.
Plain-text examples (`prompt == ""`) train on the whole text. The mixture covers doc-QA over full
contexts, retrieved-chunk contexts and compressed-looking contexts, multi-hop, needle retrieval,
Skeleton-of-Thought skeletons and point expansions, DAG plans and syntheses.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from terse.organize import formats
from terse.synth.dataset import CHARS_PER_TOKEN, SplitConfig, world_split
from terse.synth.names import Split
from terse.synth.questions import Question, context_doc_ids, needle_document
from terse.synth.render import Document
from terse.synth.tokenizer import render_chat
from terse.synth.world import World, WorldConfig, build_world


@dataclass(frozen=True)
class Example:
    prompt: str
    """Rendered chat prompt ("" for a plain language-modelling example)."""
    completion: str
    """Trained text; the EOS token is appended by the tokenizing code, not here."""
    kind: str


Context = tuple[str, str]

def _contexts(docs: Sequence[Document], gold_ids: Sequence[str], rng: random.Random, target_chars: int) -> list[Context]:
    """Gold documents among shuffled distractors, about `target_chars` long."""
    by_id = {d.doc_id: d for d in docs}
    return [(i, by_id[i].text) for i in context_doc_ids(gold_ids, docs, rng, target_chars)]


def _context_chars(rng: random.Random, max_tokens: int) -> int:
    # Log-uniform 100..max_tokens: short contexts (often the gold documents and one or two
    # distractors) make the lookup easy to learn and give many cheap examples.
    low = min(100, max_tokens)
    return round(CHARS_PER_TOKEN * low * ((max_tokens / low) ** rng.random()))


def _chunked(contexts: list[Context], gold_ids: set[str], answer_words: set[str], rng: random.Random) -> list[Context]:
    """Contexts cut into sentence-group chunks "id#n" as a retriever returns them: all chunks of gold
    documents that mention an answer word, plus a random sample of the other chunks."""
    out: list[Context] = []
    for doc_id, text in contexts:
        sentences = re.split(r"(?<=[.!?])\s+|\n", text)
        size = rng.randint(1, 3)
        for n, start in enumerate(range(0, len(sentences), size)):
            chunk = " ".join(sentences[start : start + size]).strip()
            if not chunk:
                continue
            relevant = doc_id in gold_ids and any(w in chunk for w in answer_words)
            if relevant or rng.random() < 0.35:
                out.append((f"{doc_id}#{n}", chunk))
    rng.shuffle(out)
    return out


def _compressed(contexts: list[Context], keep_words: set[str], rng: random.Random) -> list[Context]:
    """Contexts with words dropped the way a token-level compressor drops them: function words and
    filler often, capitalised words and numbers rarely, the answer and question entities never."""
    ratio = rng.uniform(0.2, 0.7)
    out = []
    for doc_id, text in contexts:
        words = []
        for word in text.split(" "):
            bare = word.strip(".,;:()")
            if bare in keep_words:
                words.append(word)
                continue
            salient = bare[:1].isupper() or bare[:1].isdigit()
            if rng.random() >= (ratio * 0.25 if salient else ratio):
                words.append(word)
        out.append((doc_id, " ".join(words)))
    return out


def _protected(q: Question) -> set[str]:
    words = set(q.answer.replace(",", " ").split())
    words |= {w.strip("?.,") for w in q.question.split() if w[:1].isupper() or w[:1].isdigit()}
    for step in q.steps:
        words |= set(step.answer.split())
    return words


def _qa(question: str, contexts: Sequence[Context], answer: str, kind: str) -> Example:
    return Example(render_chat(list(formats.qa_messages(question, contexts))), answer, kind)  # type: ignore[arg-type]


def qa_examples(q: Question, docs: Sequence[Document], rng: random.Random, max_tokens: int = 3000) -> list[Example]:
    """One doc-QA example for `q` with a full, chunked or compressed context of at most about
    `max_tokens` (plus organize steps)."""
    contexts = _contexts(docs, q.doc_ids, rng, _context_chars(rng, max_tokens))
    style = rng.random()
    if style < 0.2:
        contexts = _chunked(contexts, set(q.doc_ids), _protected(q), rng)
        kind = "qa-chunks"
    elif style < 0.4:
        contexts = _compressed(contexts, _protected(q), rng)
        kind = "qa-compressed"
    else:
        kind = "qa"
    out = [_qa(q.question, contexts, q.answer, f"{kind}-{q.kind}")]
    if q.kind == "multi" and rng.random() < 0.5:
        out += _dag_examples(q, contexts, rng)
    return out


def _dag_examples(q: Question, contexts: list[Context], rng: random.Random) -> list[Example]:
    steps = [
        formats.PlanStep(i, s.question, s.depends_on) for i, s in enumerate(q.steps, start=1)
    ]
    plan = Example(render_chat(list(formats.plan_messages(q.question, contexts))), formats.format_plan(steps), "dag-plan")  # type: ignore[arg-type]
    answers = {i: s.answer for i, s in enumerate(q.steps, start=1)}
    sub = formats.fill_answers(steps[-1].question, answers)
    sub_qa = _qa(sub, contexts, q.steps[-1].answer, "dag-subquestion")
    synthesis_contexts = contexts if rng.random() < 0.5 else []
    pairs = [(step, answers[step.step_id]) for step in steps]
    synth = Example(
        render_chat(list(formats.synthesis_messages(q.question, synthesis_contexts, pairs))),  # type: ignore[arg-type]
        q.answer,
        "dag-synthesis",
    )
    return [plan, sub_qa, synth]


def sot_examples(
    q: Question, world: World, docs: Sequence[Document], rng: random.Random, max_tokens: int = 3000
) -> list[Example]:
    """A skeleton example and one point-expansion example for a list question."""
    product_docs = [d.doc_id for d in docs if d.kind == "product" and d.title.removeprefix("The ") in q.items]
    with_products = rng.random() < 0.5
    gold = list(q.doc_ids) + (product_docs if with_products else [])
    contexts = _contexts(docs, gold, rng, _context_chars(rng, max_tokens))
    present = {d for d, _ in contexts}
    points = list(q.items)
    skeleton = Example(
        render_chat(list(formats.skeleton_messages(q.question, contexts))),  # type: ignore[arg-type]
        formats.format_skeleton(points),
        "sot-skeleton",
    )
    index = rng.randrange(len(points))
    product = world.products[points[index]]
    product_doc = next(d for d in docs if d.kind == "product" and d.title == f"The {product.name}")
    if product_doc.doc_id in present:
        sentence = f"The {product.name} is a {product.kind} made by {product.maker}, launched in {product.launch_year}."
    else:
        sentence = f"The {product.name} is one of the products made by {product.maker}."
    point = Example(
        render_chat(list(formats.point_messages(q.question, contexts, points, index))),  # type: ignore[arg-type]
        sentence,
        "sot-point",
    )
    return [skeleton, point]


def needle_example(world: World, rng: random.Random, max_tokens: int) -> Example:
    low = min(128, max_tokens)
    length_tokens = round(low * (max_tokens / low) ** rng.random())
    doc, q = needle_document(world, rng, length_chars=round(length_tokens * CHARS_PER_TOKEN), depth=rng.random(), doc_id=f"{world.split[:2]}{world.seed}-n")
    return _qa(q.question, [(doc.doc_id, doc.text)], q.answer, "needle")


RECALL_RELATIONS: dict[str, Callable[[World], dict[str, str]]] = {
    "city": lambda w: {p.name: p.city for p in w.people.values()},
    "employer": lambda w: {p.name: p.employer for p in w.people.values()},
    "birth year": lambda w: {p.name: str(p.birth_year) for p in w.people.values()},
    "maker": lambda w: {p.name: p.maker for p in w.products.values()},
    "price": lambda w: {p.name: f"{p.price} dollars" for p in w.products.values()},
    "headquarters": lambda w: {c.name: c.city for c in w.companies.values()},
}


def recall_example(world: World, rng: random.Random, max_tokens: int) -> Example:
    """Associative recall in the world's vocabulary: a directory of "key: value" lines (2 to ~max_tokens/8
    of them) and a question naming one key. The barest form of the lookup every doc-QA answer needs
    (find the line of an entity, copy what follows), learned early and fast by a small model."""
    relation = rng.choice(sorted(RECALL_RELATIONS))
    table = sorted(RECALL_RELATIONS[relation](world).items())
    rng.shuffle(table)
    rows = table[: rng.randint(2, max(2, min(len(table), max_tokens // 8)))]
    key, value = rng.choice(rows)
    text = f"Directory of {relation}\n" + "\n".join(f"{k}: {v}" for k, v in rows)
    return _qa(f"What is the {relation} listed for {key}?", [("directory", text)], value, "recall")


def lm_example(docs: Sequence[Document], rng: random.Random) -> Example:
    picked = rng.sample(list(docs), min(len(docs), rng.randint(2, 8)))
    return Example("", "\n\n".join(d.text for d in picked), "lm")


def world_examples(
    world_index: int,
    *,
    max_needle_tokens: int = 4000,
    max_context_tokens: int = 3000,
    num_recall: int = 0,
    split: Split = "train",
) -> list[Example]:
    """All training examples drawn from world `world_index` of `split` (deterministic).

    `max_context_tokens` caps doc-QA contexts (a curriculum grows it during training),
    `max_needle_tokens` caps haystacks, and `num_recall` adds that many directory-recall examples.
    """
    world = build_world(world_index, split, WorldConfig())
    config = SplitConfig(num_worlds=1, questions_per_kind=20, needle_lengths=(), needle_depths=())
    docs, questions = world_split(world, config)
    rng = random.Random(f"examples:{split}:{world_index}")
    out: list[Example] = []
    makers: dict[str, Callable[[Question], list[Example]]] = {
        "single": lambda q: qa_examples(q, docs, rng, max_context_tokens),
        "multi": lambda q: qa_examples(q, docs, rng, max_context_tokens),
        "list": lambda q: qa_examples(q, docs, rng, max_context_tokens)
        + (sot_examples(q, world, docs, rng, max_context_tokens) if rng.random() < 0.4 else []),
    }
    for q in questions:
        out += makers[q.kind](q)
    out += [needle_example(world, rng, max_needle_tokens) for _ in range(6)]
    out += [recall_example(world, rng, max_context_tokens) for _ in range(num_recall)]
    out += [lm_example(docs, rng) for _ in range(3)]
    rng.shuffle(out)
    return out
