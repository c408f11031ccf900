"""Sentence filter: inside each selected context, keep the sentences most relevant to the question.

All sentences of all selected contexts are ranked in one `Ranker.scores()` call (one batch for the LM
ranker). Each context then keeps its best sentences until they hold `sentence_budget_ratio` times its
planned token share; the rest fall to tier 2 (filled in only if budget remains, best first). Without
a question every sentence ties and the filter keeps sentences in reading order.
"""

from __future__ import annotations

from collections.abc import Sequence

from terse.compress.plan import DocPlan, StageEnv
from terse.compress.rankers import Ranker, TermStatsRanker


class SentenceFilter:
    """Drops each selected context's least relevant sentences beyond its share of the budget."""

    name = "sentence"

    def __init__(self, ranker: Ranker) -> None:
        self._ranker = ranker

    def run(self, plans: Sequence[DocPlan], env: StageEnv) -> None:
        work = [p for p in plans if p.selected and p.keep_ratio < 1.0 and p.words]
        owned: list[list[tuple[int, int]]] = []  # per plan: (index into texts, sentence id)
        texts: list[str] = []
        for plan in work:
            owned.append([])
            for sentence, (start, end) in sentence_spans(plan).items():
                owned[-1].append((len(texts), sentence))
                texts.append(plan.text[start:end])
        if not texts:
            return
        if isinstance(self._ranker, TermStatsRanker) and all(p.analysis is not None for p in work):
            stats = [(p.analysis.sentence_terms[s], p.analysis.sentence_num_terms[s])  # type: ignore[union-attr]
                     for p, items in zip(work, owned) for _, s in items]
            scores = self._ranker.scores_of_stats(stats, env.question)
        else:
            scores = self._ranker.scores(texts, env.question)
        for plan, items in zip(work, owned):
            mine = [(scores[k], s, texts[k]) for k, s in items]
            # best first; ties in reading order
            mine.sort(key=lambda item: (-item[0], item[1]))
            plan.sentence_rank = {s: r for r, (_, s, _) in enumerate(mine)}
            allowed = plan.keep_ratio * env.config.sentence_budget_ratio * plan.num_tokens
            kept: set[int] = set()
            used = 0
            counts = plan.analysis.sentence_tokens if plan.analysis is not None else None
            for _, sentence, text in mine:
                if kept and used >= allowed:
                    break
                kept.add(sentence)
                used += counts[sentence] if counts is not None else env.count_tokens(text)
            plan.sentence_kept = kept


def sentence_spans(plan: DocPlan) -> dict[int, tuple[int, int]]:
    """Sentence id -> (start, end) characters in the plan's text, in reading order."""
    spans: dict[int, tuple[int, int]] = {}
    for word, sentence in zip(plan.words, plan.sentence_ids):
        start = spans[sentence][0] if sentence in spans else word.start
        spans[sentence] = (start, word.end)
    return spans
