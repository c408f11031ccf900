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

import numpy as np

from terse.compress.plan import DocPlan, TokenCounter
from terse.compress.result import KeptSpan
from terse.compress.words import join_words
from terse.errors import InvalidRequestError

_MAX_FILL_MISSES = 8  # the fill pass gives up after this many measured words in a row overflow


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


def priority_order(plans: Sequence[DocPlan]) -> list[tuple[int, int]]:
    """Every (plan position, word) pair in keep-priority order (`DocPlan.priority`; ties: plan order)."""
    parts = [(i, p.priority_arrays()) for i, p in enumerate(plans) if p.words]
    if not parts:
        return []
    tier = np.concatenate([a[0] for _, a in parts])
    group = np.concatenate([a[1] for _, a in parts])
    key = np.concatenate([a[2] for _, a in parts])
    rank = np.concatenate([np.full(len(a[0]), plans[i].rank, dtype=np.int64) for i, a in parts])
    word = np.concatenate([np.arange(len(a[0]), dtype=np.int64) for _, a in parts])
    plan = np.concatenate([np.full(len(a[0]), i, dtype=np.int64) for i, a in parts])
    idx = np.lexsort((plan, word, rank, key, group, tier))  # the last key sorts first
    return list(zip(plan[idx].tolist(), word[idx].tolist()))


def floor_error(floor: int, target: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"the instruction, question and protected spans alone take {floor} tokens, over the "
        f"target of {target}; raise the budget, shorten them, or protect less"
    )


def fit(
    plans: Sequence[DocPlan],
    prompt: Prompt,
    count_tokens: TokenCounter,
    target: int,
    max_probes: int,
    order: Sequence[tuple[int, int]] | None = None,
) -> tuple[Assembled, int]:
    """The best-priority prompt within `target` tokens and its token count.

    Raises `InvalidRequestError` when the instruction, question and protected spans alone exceed it.

    Tokenizer calls are what this costs, so the search starts where a per-word estimate (each context's
    tokens per character) says the budget runs out, brackets the answer outward from there, and
    bisects only inside the bracket. The fill pass measures only words whose estimate fits the tokens
    left, and stops after a run of misses.
    """
    if order is None:
        order = priority_order(plans)
    # without offsets every protected word is mandatory (structural spans included): a prefix cut inside
    # a multi-word span could not be told apart from a whole one
    num_mandatory = sum(1 for i, w in order if plans[i].protected(w))
    per_char = [p.num_tokens / max(1, len(p.text)) for p in plans]

    def estimate(iw: tuple[int, int]) -> float:
        """Tokens the word adds, its separator included (an estimate: merges at seams vary)."""
        span = plans[iw[0]].words[iw[1]]
        return (span.end - span.start + 1) * per_char[iw[0]]

    def kept_of(chosen: Sequence[tuple[int, int]]) -> list[list[int]]:
        kept: list[list[int]] = [[] for _ in plans]
        for i, w in chosen:
            kept[i].append(w)
        for k in kept:
            k.sort()
        return kept

    def measure(chosen: Sequence[tuple[int, int]]) -> int:
        return count_tokens(assemble(plans, kept_of(chosen), prompt).text)

    def result(chosen: Sequence[tuple[int, int]], count: int) -> tuple[Assembled, int]:
        return assemble(plans, kept_of(chosen), prompt), count

    full = measure(order)
    if full <= target:
        return result(order, full)
    floor = measure(order[:num_mandatory])
    if floor > target:
        raise floor_error(floor, target)
    # measure(order[:lo]) fits with `lo_count` tokens, measure(order[:hi]) does not
    lo, lo_count, hi = num_mandatory, floor, len(order)
    guess, room = num_mandatory, float(target - floor)
    while guess < len(order) and room >= estimate(order[guess]):
        room -= estimate(order[guess])
        guess += 1
    # gallop from the guess, in the one direction its measurement points, until the answer is bracketed
    probe, step = min(max(guess, lo + 1), hi - 1), 8
    upward: bool | None = None
    while lo < probe < hi:
        count = measure(order[:probe])
        fits = count <= target
        if upward is None:
            upward = fits
        if fits:
            lo, lo_count = probe, count
        else:
            hi = probe
        if fits != upward:
            break
        probe = min(probe + step, hi - 1) if upward else max(probe - step, lo + 1)
        step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        count = measure(order[:mid])
        if count <= target:
            lo, lo_count = mid, count
        else:
            hi = mid
    chosen, best = list(order[:lo]), lo_count
    misses = 0
    for extra in order[hi : hi + max_probes]:
        if best >= target or misses >= _MAX_FILL_MISSES:
            break
        if estimate(extra) > target - best + 1:
            continue  # cannot fit by the estimate: not worth a tokenizer call
        count = measure([*chosen, extra])
        if count <= target:
            chosen.append(extra)
            best, misses = count, 0
        else:
            misses += 1
    return result(chosen, best)
