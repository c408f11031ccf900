"""Coarse stage: rank contexts by relevance to the question, keep the best within budget, plan ratios.

    ranked:   c3  c0  c5  c1  c4  c2          (by ranker score, best first)
    tokens:   90  120 60  200 80  150
    budget x context_budget_ratio = 300  ->  keep c3 c0 c5 c1 (c1 crosses 300: kept, the rest dropped)
    ratios:   mean r = budget / 470, spread by rank: c3 r(1+s) ... c1 r(1-s)

At least one context is always kept. Dropped contexts stay in the plan (tier 3) so the exact-fit
stage can still fill leftover budget with them, best first.
"""

from __future__ import annotations

from collections.abc import Sequence

from terse.compress.plan import DocPlan, StageEnv
from terse.compress.rankers import Ranker, TermStatsRanker

_MIN_RATIO = 0.02


class CoarseStage:
    """Ranks contexts with a `Ranker`, selects within budget and assigns dynamic keep ratios."""

    name = "coarse"

    def __init__(self, ranker: Ranker) -> None:
        self._ranker = ranker

    def run(self, plans: Sequence[DocPlan], env: StageEnv) -> None:
        if not plans:
            return
        if isinstance(self._ranker, TermStatsRanker) and all(p.analysis is not None for p in plans):
            stats = [(p.analysis.doc_terms, p.analysis.doc_num_terms) for p in plans]  # type: ignore[union-attr]
            scores = self._ranker.scores_of_stats(stats, env.question)
        else:
            scores = self._ranker.scores([p.text for p in plans], env.question)
        # stable sort: ties keep input order, so an uninformative ranker leaves the order as given
        order = sorted(range(len(plans)), key=lambda i: -scores[i])
        for rank, i in enumerate(order):
            plans[i].rank = rank
            plans[i].score = scores[i]
        limit = env.context_budget * env.config.context_budget_ratio
        used = 0
        for i in order:
            # the context that crosses the limit is kept too, so the selection always covers the budget
            plans[i].selected = used < limit
            used += plans[i].num_tokens if plans[i].selected else 0
        assign_ratios([plans[i] for i in order if plans[i].selected], env.context_budget, env.config.dynamic_ratio_spread)


def assign_ratios(selected: Sequence[DocPlan], context_budget: int, spread: float) -> None:
    """Give each selected plan (best first) a keep ratio: the mean that meets the budget, spread by rank."""
    total = sum(p.num_tokens for p in selected)
    if total == 0:
        return
    mean = min(1.0, context_budget / total)
    last = max(1, len(selected) - 1)
    for position, plan in enumerate(selected):
        tilt = 1.0 + spread * (1.0 - 2.0 * position / last) if len(selected) > 1 else 1.0
        plan.keep_ratio = min(1.0, max(_MIN_RATIO, mean * tilt))


def output_order(plans: Sequence[DocPlan], reorder: str) -> list[int]:
    """Positions (into `plans`) in output order: input order, by rank, or best at both ends."""
    by_rank = sorted(range(len(plans)), key=lambda i: plans[i].rank)
    if reorder == "original":
        return list(range(len(plans)))
    if reorder == "rank":
        return by_rank
    front = by_rank[0::2]
    back = by_rank[1::2]
    return front + back[::-1]
