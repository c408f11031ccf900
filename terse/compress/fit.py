"""Exact fit: keep words in priority order until the prompt holds the target's tokens, measured for real.

All words of all contexts are sorted by `DocPlan.priority`. The fit keeps a prefix of that order:
binary search finds the longest prefix whose assembled prompt (instruction, contexts, question, as
returned) the target tokenizer counts within the budget; then a greedy pass tries the next words in
order, skipping any that would overflow, to use up the last few tokens. Every accepted state was
measured, so the result never exceeds the target, whatever the tokenizer does at word seams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from terse.compress.plan import DocPlan, TokenCounter
from terse.compress.result import KeptSpan
from terse.compress.words import join_words
from terse.errors import InvalidRequestError


@dataclass(frozen=True)
class Prompt:
    """The parts around the contexts and how they are joined."""

    instruction: str
    question: str
    separator: str
    order: tuple[int, ...]
    """Positions into the plans list in output order."""


@dataclass(frozen=True)
class Assembled:
    """One candidate prompt: its text, per-plan compressed text and kept spans."""

    text: str
    contexts: list[str]
    spans: list[KeptSpan]


def assemble(plans: Sequence[DocPlan], kept: Sequence[Sequence[int]], prompt: Prompt) -> Assembled:
    """Join the kept words (sorted indices per plan) into the full prompt, mapping every kept piece."""
    sep = prompt.separator
    contexts = [join_words(p.text, p.words, k) if k else ("", []) for p, k in zip(plans, kept)]
    pieces: list[str] = []
    spans: list[KeptSpan] = []
    pos = 0
    if prompt.instruction:
        pieces.append(prompt.instruction)
        pos = len(prompt.instruction)
    for i in prompt.order:
        text, out = contexts[i]
        if not text:
            continue
        if pieces:
            pieces.append(sep)
            pos += len(sep)
        spans.extend(_merge_spans(plans[i], kept[i], out, pos))
        pieces.append(text)
        pos += len(text)
    if prompt.question:
        pieces.append(sep if pieces else "")
        pieces.append(prompt.question)
    return Assembled("".join(pieces), [c[0] for c in contexts], spans)


def _merge_spans(plan: DocPlan, kept: Sequence[int], out: Sequence[tuple[int, int]], base: int) -> list[KeptSpan]:
    """Runs of neighbouring kept words become one span (their original whitespace is kept too)."""
    spans: list[KeptSpan] = []
    for j, w in enumerate(kept):
        start, end = plan.words[w]
        if j and kept[j - 1] == w - 1:
            last = spans[-1]
            spans[-1] = KeptSpan(plan.index, last.start, end, last.output_start, base + out[j][1])
        else:
            spans.append(KeptSpan(plan.index, start, end, base + out[j][0], base + out[j][1]))
    return spans


def fit(
    plans: Sequence[DocPlan], prompt: Prompt, count_tokens: TokenCounter, target: int, max_probes: int
) -> tuple[Assembled, int]:
    """The best-priority prompt within `target` tokens and its token count.

    Raises `InvalidRequestError` when the instruction, question and protected spans alone exceed it.
    """
    order = sorted(
        ((i, w) for i, p in enumerate(plans) for w in range(len(p.words))),
        key=lambda iw: plans[iw[0]].priority(iw[1]),
    )
    num_mandatory = sum(1 for i, w in order if plans[i].protected(w))

    def measure(chosen: Sequence[tuple[int, int]]) -> tuple[Assembled, int]:
        kept: list[list[int]] = [[] for _ in plans]
        for i, w in chosen:
            kept[i].append(w)
        for k in kept:
            k.sort()
        assembled = assemble(plans, kept, prompt)
        return assembled, count_tokens(assembled.text)

    best = measure(order)
    if best[1] <= target:
        return best
    best = measure(order[:num_mandatory])
    if best[1] > target:
        raise InvalidRequestError(
            f"the instruction, question and protected spans alone take {best[1]} tokens, over the "
            f"target of {target}; raise the budget, shorten them, or protect less"
        )
    lo, hi = num_mandatory, len(order)  # measure(order[:lo]) fits, measure(order[:hi]) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = measure(order[:mid])
        if candidate[1] <= target:
            lo, best = mid, candidate
        else:
            hi = mid
    chosen = list(order[:lo])
    for extra in order[hi : hi + max_probes]:
        if best[1] >= target:
            break
        candidate = measure([*chosen, extra])
        if candidate[1] <= target:
            chosen.append(extra)
            best = candidate
    return best
