"""Token-level stage: rank the words of each selected context by (question-conditioned) surprisal.

Candidates are the words the sentence filter kept plus forced words (the user's literals; structural
spans unless they rank with their context: `DocPlan.forced`), joined as the result would
join them. They are cut into segments of ~`segment_tokens` scorer tokens. Two pruners share the rest:

- "iterative": segment i is scored with prefix = question + the words kept from segments < i, so
  each call's prefix extends the previous one's and a prefix-caching backend prefills only the new
  part. A controller spreads the context's budget: after each segment the ratio for the next is
  (planned tokens - kept so far) / tokens still to come.

      prefix(i)   = Q "\\n\\n" K0 " " K1 ... K(i-1)
      text(i)     = " " S(i)               -> keys for S(i) -> K(i) = words of S(i) with key < 1

  Past `max_prefix_tokens` of kept text the oldest half is left out of the prefix (the window).
- "parallel": every segment of every context conditioned on the question alone, all in batched
  `score()` calls; no controller. Fastest on backends without a prefix cache.

Keys (see `scoring.keys_for_segment`) go to `DocPlan.word_keys`; the exact-fit stage decides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from terse.backend.base import Backend
from terse.compress.plan import DocPlan, Stage, StageEnv
from terse.compress.rankers import terms
from terse.compress.scoring import keys_for_segment, segment_bounds, word_stats
from terse.compress.words import Span, join_words
from terse.errors import ConfigError

_MIN_RATIO = 0.02
_BATCH = 8  # segments per score() call in the parallel pruner
_QUESTION_TERM_BONUS = 100.0  # nats: above any real surprisal


@dataclass
class _Candidates:
    """The words of one plan the token stage ranks, joined into the text that gets scored."""

    plan: DocPlan
    word_ids: list[int]  # indices into plan.words, ascending
    text: str
    spans: list[Span]  # span of each candidate word in `text`
    protected: list[bool]
    ratio: float  # share of the candidates' tokens to keep
    boosted: list[bool]  # words sharing a term with the question: ranked before all others


def _boost(surprisal: list[float], boosted: Sequence[bool]) -> list[float]:
    """Question-conditioned surprisal is low exactly on words the question already names (its entity,
    say), which are the words worth keeping most; those words are ranked first instead."""
    return [s + _QUESTION_TERM_BONUS if b else s for s, b in zip(surprisal, boosted)]


def _candidates(plan: DocPlan, env: StageEnv) -> _Candidates | None:
    ids = [w for w in range(len(plan.words)) if plan.candidate(w)]
    if not ids:
        return None
    text, out = join_words(plan.text, plan.words, ids)
    num_tokens = env.tokens_of_words(plan, ids, text)
    ratio = min(1.0, plan.keep_ratio * plan.num_tokens / max(1, num_tokens))
    protected = [plan.forced(w) for w in ids]  # spans ranked with their context are scored like their neighbours
    question_terms = set(terms(env.question)) if env.config.keep_question_terms else set()
    boosted = [bool(question_terms.intersection(terms(plan.text[plan.words[w].start : plan.words[w].end])))
               for w in ids]
    return _Candidates(plan, ids, text, [Span(a, b) for a, b in out], protected, ratio, boosted)


def _window_plan(scorer: Backend, question_block: str, segment_tokens: int, cap: int) -> tuple[int, int]:
    """(segment tokens, kept-text tokens the prefix may carry) so question + prefix + segment fit the
    scorer's window. Segments shrink for small windows; a factor 2 covers the char-based estimate."""
    num_question = scorer.count_tokens(question_block) if question_block else 0
    free = scorer.max_model_len - num_question - 8
    segment = min(segment_tokens, free // 4)
    if segment < 4:
        raise ConfigError(
            f"question ({num_question} tokens) leaves no room to score text in the scorer's window of "
            f"{scorer.max_model_len}; shorten the question or set token_pruner=None"
        )
    return segment, min(cap, free - 2 * segment)


def _question_block(question: str) -> str:
    return question.strip() + "\n\n" if question.strip() else ""


class IterativePruner:
    """Segment-by-segment scoring conditioned on the question and the text kept so far."""

    name = "token"

    def run(self, plans: Sequence[DocPlan], env: StageEnv) -> None:
        scorer = _need_scorer(env)
        block = _question_block(env.question)
        segment, room = _window_plan(scorer, block, env.config.segment_tokens, env.config.max_prefix_tokens)
        for plan in sorted((p for p in plans if p.selected), key=lambda p: p.rank):
            cands = _candidates(plan, env)
            if cands is not None and cands.ratio < 1.0:
                self._prune(cands, scorer, block, room, segment)

    def _prune(self, cands: _Candidates, scorer: Backend, block: str, room: int, segment_tokens: int) -> None:
        num_total = float(scorer.count_tokens(cands.text))
        planned = cands.ratio * num_total
        bounds = segment_bounds(cands.spans, num_total, segment_tokens)
        keys = [math.inf] * len(cands.word_ids)
        kept_words: list[tuple[str, float]] = []  # (word text, scorer tokens) in the prefix window
        kept_tokens = 0.0
        num_done = 0.0
        for first, last in bounds:
            seg_start = cands.spans[first].start
            seg_text = cands.text[seg_start : cands.spans[last - 1].end]
            lead = " " if kept_words else ""
            prefix = block + " ".join(w for w, _ in kept_words)
            scores = scorer.score([lead + seg_text], prefix=prefix)[0]
            local = [Span(a - seg_start + len(lead), b - seg_start + len(lead)) for a, b in cands.spans[first:last]]
            stats = word_stats(scores, local)
            seg_tokens = sum(stats.num_tokens)
            ratio = min(1.0, max(_MIN_RATIO, (planned - kept_tokens) / max(1.0, num_total - num_done)))
            surprisal = _boost(stats.surprisal, cands.boosted[first:last])
            seg_keys = keys_for_segment(surprisal, stats.num_tokens, cands.protected[first:last], ratio)
            for j, key in enumerate(seg_keys):
                keys[first + j] = key
                if key < 1.0 or cands.protected[first + j]:
                    kept_tokens += stats.num_tokens[j]
                    a, b = local[j]
                    kept_words.append(((lead + seg_text)[a:b], stats.num_tokens[j]))
            num_done += seg_tokens
            kept_words = _window(kept_words, room)
        _store(cands, keys)


def _window(kept_words: list[tuple[str, float]], room: int) -> list[tuple[str, float]]:
    """Drop the oldest half of the window at once when it overflows, so later prefixes share again."""
    if sum(n for _, n in kept_words) <= room:
        return kept_words
    budget = room / 2
    out: list[tuple[str, float]] = []
    for word, n in reversed(kept_words):
        if budget - n < 0:
            break
        budget -= n
        out.append((word, n))
    return out[::-1]


class ParallelPruner:
    """Every segment conditioned on the question only, scored in batched calls."""

    name = "token"

    def run(self, plans: Sequence[DocPlan], env: StageEnv) -> None:
        scorer = _need_scorer(env)
        block = _question_block(env.question)
        segment, _ = _window_plan(scorer, block, env.config.segment_tokens, 0)
        jobs: list[tuple[_Candidates, int, int]] = []
        for plan in plans:
            cands = _candidates(plan, env) if plan.selected else None
            if cands is not None and cands.ratio < 1.0:
                bounds = segment_bounds(cands.spans, scorer.count_tokens(cands.text), segment)
                jobs.extend((cands, first, last) for first, last in bounds)
        all_keys: dict[int, list[float]] = {}
        for i in range(0, len(jobs), _BATCH):
            batch = jobs[i : i + _BATCH]
            texts = [c.text[c.spans[f].start : c.spans[e - 1].end] for c, f, e in batch]
            for (cands, first, last), ts in zip(batch, scorer.score(texts, prefix=block)):
                base = cands.spans[first].start
                stats = word_stats(ts, [Span(a - base, b - base) for a, b in cands.spans[first:last]])
                surprisal = _boost(stats.surprisal, cands.boosted[first:last])
                seg_keys = keys_for_segment(surprisal, stats.num_tokens, cands.protected[first:last], cands.ratio)
                keys = all_keys.setdefault(id(cands), [math.inf] * len(cands.word_ids))
                keys[first:last] = seg_keys
        for cands in {id(c): c for c, _, _ in jobs}.values():
            _store(cands, all_keys[id(cands)])


def _store(cands: _Candidates, keys: list[float]) -> None:
    word_keys = [math.inf] * len(cands.plan.words)
    for w, key in zip(cands.word_ids, keys):
        word_keys[w] = key
    cands.plan.word_keys = word_keys


def _need_scorer(env: StageEnv) -> Backend:
    if env.scorer is None:
        raise ConfigError("the token-level stage needs a scorer Backend; pass one or set token_pruner=None")
    return env.scorer


TOKEN_PRUNERS: dict[str, Callable[[], Stage]] = {"iterative": IterativePruner, "parallel": ParallelPruner}
