"""Greedy exact-match evaluation of a causal LM on synthetic doc-QA questions (full contexts).

Used at the end of training (validation split) and usable on any split; plain transformers, batched
greedy generation with left padding.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from terse.answer_match import exact_match
from terse.organize.formats import qa_messages
from terse.synth.dataset import SplitData
from terse.synth.questions import Question
from terse.synth.tokenizer import render_chat


def qa_prompt(q: Question, data: SplitData) -> str:
    contexts = [(i, data.document(i).text) for i in q.context_doc_ids]
    return render_chat(list(qa_messages(q.question, contexts)))  # type: ignore[arg-type]


@torch.no_grad()
def greedy_answers(model: Any, tok: Any, prompts: list[str], *, batch_size: int = 32, max_new_tokens: int = 48) -> list[str]:
    """Greedy completions of `prompts` (batched by length, left padding), decoded without specials."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    tok.padding_side = "left"
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        for row, i in enumerate(idx):
            out[i] = tok.decode(gen[row, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return out


def evaluate(model: Any, tok: Any, data: SplitData, *, batch_size: int = 32) -> dict[str, Any]:
    """Exact match per question kind (and per needle length) with each question's full context."""
    questions = data.questions
    predictions = greedy_answers(model, tok, [qa_prompt(q, data) for q in questions], batch_size=batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    examples = []
    for q, p in zip(questions, predictions):
        ok = exact_match(p, q.answer, q.items)
        hits[q.kind].append(ok)
        if q.kind == "needle":
            hits[f"needle@{q.context_doc_ids[0].split('-n')[-1].split('-')[0]}"].append(ok)
        if len(examples) < 12:
            examples.append({"question": q.question, "answer": q.answer, "prediction": p, "correct": ok})
    return {
        "exact_match": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
        "num_questions": {k: len(v) for k, v in sorted(hits.items())},
        "examples": examples,
    }
