"""Exact fit from token offsets: price kept words from each context's one tokenization, verify once.

`KeptState` holds the kept words of every context and the prompt's token count as the model prices
it. A context's kept words are joined as `words.join_words` joins them, so its tokens are:

    kept:    w3 w4 . . w7          (w5, w6 deleted; the stretch held no newline -> one space)
    tokens:  word(w3) + gap(w4) + word(w4) + repl(" ") + word(w7)

word(w) and gap(w) come from the context's analysis (the tokens its last character falls in);
a deleted stretch costs what its replacement separator costs alone, unless the replacement equals
the kept word's original gap, whose tokens are known. A prompt with m contexts present costs
base + m x (separator + context) tokens, where base = the verbatim parts as measured around a
one-token stand-in context. This is exact whenever the tokenizer does not merge across word
boundaries; `fit_by_model` checks it with one tokenization of the chosen prompt and, when a merge
made the model wrong, re-fits against the corrected budget (a few rounds) before giving up.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

from terse.compress.analysis import DocAnalysis, PromptCosts, link_tokens
from terse.compress.fit import Assembled, Prompt, assemble, fit, floor_error, priority_order
from terse.compress.plan import DocPlan
from terse.compress.tokenizer import TargetTokenizer

_MAX_FILL_MISSES = 8  # as in the measured fit: the fill pass gives up after this many misses in a row
_MAX_ROUNDS = 4  # model corrections after a verification disagreed
_CLOSE_ENOUGH = 2  # a corrected model fit this close to the target is kept; further off, measure


class KeptState:
    """Kept words per context and the prompt's tokens as priced by the model (see module docstring)."""

    def __init__(self, plans: Sequence[DocPlan], costs: PromptCosts) -> None:
        self.plans = plans
        self.costs = costs
        self.kept: list[list[int]] = [[] for _ in plans]
        self.context_tokens = [0] * len(plans)
        self.total = costs.base

    def _link(self, a: DocAnalysis, x: int, y: int) -> int:
        return link_tokens(a, x, y, self.costs.space, self.costs.newline)

    def delta(self, i: int, w: int) -> int:
        """Tokens the prompt gains if word w of plan i is kept too."""
        a = self.plans[i].analysis
        assert a is not None and a.word_tokens is not None
        kept = self.kept[i]
        pos = bisect_left(kept, w)
        p = kept[pos - 1] if pos > 0 else None
        n = kept[pos] if pos < len(kept) else None
        d = a.word_tokens[w]
        if p is None and n is None:
            return d + self.costs.separator
        if p is None:
            return d + self._link(a, w, n)  # type: ignore[arg-type]
        if n is None:
            return d + self._link(a, p, w)
        return d + self._link(a, p, w) + self._link(a, w, n) - self._link(a, p, n)

    def add(self, i: int, w: int, delta: int) -> None:
        """Keep word w of plan i; `delta` must be `self.delta(i, w)` taken just before."""
        insort(self.kept[i], w)
        self.total += delta
        self.context_tokens[i] += delta - (self.costs.separator if len(self.kept[i]) == 1 else 0)

    def remove(self, i: int, w: int, delta: int) -> None:
        """Undo the latest `add(i, w, delta)` (adds are undone in reverse order)."""
        self.context_tokens[i] -= delta - (self.costs.separator if len(self.kept[i]) == 1 else 0)
        self.kept[i].remove(w)
        self.total -= delta


def choose(
    plans: Sequence[DocPlan], order: Sequence[tuple[int, int]], costs: PromptCosts, budget: int, max_probes: int
) -> KeptState:
    """Kept words under `budget` by the model: the longest prefix of `order` that fits, then a greedy
    fill from the words after it (as the measured fit does). A structural protected span is one unit
    of the prefix (kept whole or not at all) and is never used for the fill."""
    state = KeptState(plans, costs)
    pos = 0
    while pos < len(order):
        i, w = order[pos]
        group = plans[i].span_group(w)
        end = pos + 1
        if group >= 0:
            while end < len(order) and order[end][0] == i and plans[i].span_group(order[end][1]) == group:
                end += 1
        added = []
        for k in range(pos, end):
            d = state.delta(*order[k])
            state.add(*order[k], d)
            added.append(d)
        if state.total > budget:
            for k, d in zip(range(end - 1, pos - 1, -1), reversed(added)):
                state.remove(*order[k], d)
            break
        pos = end
    else:
        return state
    # as in the measured fit: the first word that did not fit is skipped, then a greedy fill
    per_char = [p.num_tokens / max(1, len(p.text)) for p in plans]
    misses = 0
    for i, w in order[end : end + max_probes]:
        if state.total >= budget or misses >= _MAX_FILL_MISSES:
            break
        span = plans[i].words[w]
        if plans[i].span_group(w) >= 0 or (span.end - span.start + 1) * per_char[i] > budget - state.total + 1:
            continue  # a span is one unit; and the measured fit never tries a word its estimate rules out
        d = state.delta(i, w)
        if state.total + d <= budget:
            state.add(i, w, d)
            misses = 0
        else:
            misses += 1
    return state


def fit_by_model(
    plans: Sequence[DocPlan],
    order: Sequence[tuple[int, int]],
    prompt: Prompt,
    tokenizer: TargetTokenizer,
    costs: PromptCosts,
    target: int,
    max_probes: int,
) -> tuple[Assembled, int, KeptState | None] | None:
    """The fitted prompt, its measured token count and (when the model was exact) its state.

    None when the model could not be brought to a measured fit within a few rounds, or only to one
    more than a couple of tokens under the target (the caller then falls back to the measured search).
    Every returned prompt was measured: never over `target`.
    """
    best: tuple[Assembled, int, KeptState | None] | None = None
    budget = target
    tried: set[int] = set()
    for _ in range(_MAX_ROUNDS):
        tried.add(budget)
        state = choose(plans, order, costs, budget, max_probes)
        assembled = assemble(plans, state.kept, prompt)
        real = tokenizer.count(assembled.text)
        if real == state.total and budget == target:
            return assembled, real, state
        if real <= target and (best is None or real > best[1]):
            best = (assembled, real, None)
        # the model was off by (real - its total) here: re-fit against the corrected budget
        budget = target - (real - state.total)
        if real == target or budget in tried or budget < 0:
            break
    if best is not None and target - best[1] > max(_CLOSE_ENOUGH, target // 100):
        return None  # merges across cuts (e.g. byte-level BPE inside CJK runs): measure instead
    return best


def fit_exact(
    plans: Sequence[DocPlan],
    prompt: Prompt,
    tokenizer: TargetTokenizer,
    costs: PromptCosts | None,
    target: int,
    max_probes: int,
) -> tuple[Assembled, int, KeptState | None]:
    """The best-priority prompt within `target` tokens, its count and the model state (None when the
    count was measured some other way). Priced by the model when every context has offsets, by the
    measured search (`fit.fit`) otherwise or when the model cannot be reconciled with the tokenizer.

    Raises `InvalidRequestError` when the instruction, question and hard-protected spans alone exceed it.
    """
    order = priority_order(plans)
    if costs is None or any(p.analysis is None or not p.analysis.has_offsets for p in plans):
        assembled, count = fit(plans, prompt, tokenizer.count, target, max_probes, order=order)
        return assembled, count, None
    num_mandatory = sum(1 for i, w in order if plans[i].mandatory(w))
    floor = KeptState(plans, costs)
    for i, w in order[:num_mandatory]:
        floor.add(i, w, floor.delta(i, w))
    if floor.total > target:
        real_floor = tokenizer.count(assemble(plans, floor.kept, prompt).text)
        if real_floor > target:
            raise floor_error(real_floor, target)
    fitted = fit_by_model(plans, order, prompt, tokenizer, costs, target, max_probes)
    if fitted is not None:
        return fitted
    assembled, count = fit(plans, prompt, tokenizer.count, target, max_probes, order=order)
    return assembled, count, None
