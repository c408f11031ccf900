"""Exact fit: keep words in priority order until the prompt holds the target's tokens, measured for real.

All words of all contexts are sorted by `DocPlan.priority`. The fit keeps a prefix of that order that
ends between units (a structural protected span is one unit: kept whole or dropped whole):
binary search finds the longest prefix whose assembled prompt (instruction, contexts, question, as
returned) the target tokenizer counts within the budget; then a greedy pass tries the next words in
order, skipping any that would overflow, to use up the last few tokens. Every accepted state was
measured, so the result never exceeds the target, whatever the tokenizer does at word seams.
"""

from __future__ import annotations

from bisect import bisect_right
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
    """Every (plan position, word) pair in keep-priority order (`DocPlan.priority`; ties: plan order,
    then word order). The words of one structural span are consecutive in it."""
    parts = [(i, p.priority_arrays()) for i, p in enumerate(plans) if p.words]
    if not parts:
        return []
    tier = np.concatenate([a[0] for _, a in parts])
    group = np.concatenate([a[1] for _, a in parts])
    key = np.concatenate([a[2] for _, a in parts])
    unit = np.concatenate([a[3] for _, a in parts])
    rank = np.concatenate([np.full(len(a[0]), plans[i].rank, dtype=np.int64) for i, a in parts])
    word = np.concatenate([np.arange(len(a[0]), dtype=np.int64) for _, a in parts])
    plan = np.concatenate([np.full(len(a[0]), i, dtype=np.int64) for i, a in parts])
    idx = np.lexsort((word, plan, unit, rank, key, group, tier))  # the last key sorts first
    return list(zip(plan[idx].tolist(), word[idx].tolist()))


def unit_bounds(plans: Sequence[DocPlan], order: Sequence[tuple[int, int]]) -> list[int]:
    """Prefix lengths of `order` that end between units (never inside a structural span), ascending,
    0 and len(order) included."""
    bounds = [0]
    for k in range(1, len(order)):
        (i, w), (j, v) = order[k - 1], order[k]
        group = plans[i].span_group(w)
        if not (group >= 0 and i == j and plans[j].span_group(v) == group):
            bounds.append(k)
    if order:
        bounds.append(len(order))
    return bounds


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

    Raises `InvalidRequestError` when the instruction, question and the user's literals alone exceed it.

    Tokenizer calls are what this costs, so the search starts where a per-word estimate (each context's
    tokens per character) says the budget runs out, brackets the answer outward from there, and
    bisects only inside the bracket. The fill pass measures only words whose estimate fits the tokens
    left, and stops after a run of misses.
    """
    if order is None:
        order = priority_order(plans)
    num_mandatory = sum(1 for i, w in order if plans[i].mandatory(w))
    # the prefixes tried end between units: a structural span is kept whole or not at all
    bounds = [b for b in unit_bounds(plans, order) if b >= num_mandatory]
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
    # lo, hi index `bounds`: measure(order[:bounds[lo]]) fits with `lo_count` tokens, order[:bounds[hi]] does not
    lo, lo_count, hi = 0, floor, len(bounds) - 1
    guess, room = num_mandatory, float(target - floor)
    while guess < len(order) and room >= estimate(order[guess]):
        room -= estimate(order[guess])
        guess += 1
    # gallop from the guess, in the one direction its measurement points, until the answer is bracketed
    probe, step = min(max(bisect_right(bounds, guess) - 1, lo + 1), hi - 1), 8
    upward: bool | None = None
    while lo < probe < hi:
        count = measure(order[: bounds[probe]])
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
        count = measure(order[: bounds[mid]])
        if count <= target:
            lo, lo_count = mid, count
        else:
            hi = mid
    chosen, best = list(order[: bounds[lo]]), lo_count
    misses = 0
    # the unit that did not fit is skipped; single words after it may still fit (spans are units: not tried)
    for extra in order[bounds[hi] : bounds[hi] + max_probes]:
        if best >= target or misses >= _MAX_FILL_MISSES:
            break
        if plans[extra[0]].span_group(extra[1]) >= 0 or estimate(extra) > target - best + 1:
            continue  # a span is one unit; and a word that cannot fit by the estimate is not worth a call
        count = measure([*chosen, extra])
        if count <= target:
            chosen.append(extra)
            best, misses = count, 0
        else:
            misses += 1
    return result(chosen, best)
