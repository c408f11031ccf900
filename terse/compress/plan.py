"""The working state the stages share (`DocPlan`), the `Stage` protocol, and the keep-priority order.

Stages never delete text themselves. Each one refines, per context, which words are worth keeping
most, and the exact-fit stage then keeps words in that priority order until the budget is full:

    tier 0  the user's literals and patterns, anywhere (mandatory: the fit's floor); then, unless the
            policy ranks them with their context, structural spans in selected contexts
    tier 1  words of selected contexts, in two groups: first the sentences that share a search term
            with the question, then those that share none (`question_sentences_first`); within a group,
            sentences the sentence filter keeps (by token key, or by sentence rank when no token
            stage ran) before filtered-out ones (best sentence first)
    tier 3  words of contexts the coarse stage dropped, best context first

Within tier 1 the key is the token stage's `cumulative token share / keep ratio` of the word in its
segment (see `tokens.py`): below 1.0 means "kept under the planned per-context ratios", so moving one
global threshold scales every context's share in proportion: that is how the budget is spread.

Structural protected spans (numbers, dates, URLs, code, ...; `ProtectionPolicy`'s flags) are atomic:
all words of one span share the best key among them and sit next to each other in the order, so the
fit keeps a span whole or drops it whole. By default (`struct_first`) those of selected contexts are
tier 0 after the user's literals, kept ahead of their context but not mandatory: when they do not all
fit, the spans of the best contexts are kept. With `ProtectionPolicy.rank_with_context` they carry no
privilege: a span ranks as its best word, with its sentence and context, and a number whose sentence
the fit cuts goes with that sentence instead of standing alone in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from terse.backend.base import Backend
from terse.compress.analysis import DocAnalysis, PromptCosts, joined_tokens
from terse.compress.config import CompressorConfig
from terse.compress.words import Span

TokenCounter = Callable[[str], int]


@dataclass
class DocPlan:
    """One context and what the stages decided about it so far (mutated by the stages, in order)."""

    index: int
    """Index of the context in the caller's list."""
    text: str
    """The original context."""
    words: list[Span]
    """Its words (see `words.split_words`)."""
    sentence_ids: list[int]
    """Sentence number of each word."""
    user_protected: list[bool]
    """Words overlapping the user's literals / patterns: kept even when the context is dropped."""
    struct_protected: list[bool]
    """Words overlapping structural protected spans: kept whole or dropped whole, ranked with their
    context (see the module docstring)."""
    num_tokens: int
    """Tokens of `text` in the target tokenizer."""
    rank: int = 0
    """Coarse rank, 0 = best (input order until a ranker runs)."""
    score: float = 0.0
    """Coarse ranker score (higher = more relevant)."""
    selected: bool = True
    """Whether the coarse stage keeps this context."""
    keep_ratio: float = 1.0
    """Planned share of the context's tokens to keep (set by the coarse stage)."""
    sentence_rank: dict[int, int] | None = None
    """Sentence id -> rank within the context (0 = best); None until the sentence filter runs."""
    sentence_kept: set[int] | None = None
    """Sentence ids the sentence filter keeps; None means all."""
    word_keys: list[float] | None = None
    """Token-stage priority of each word, lower = keep first; None until the token stage runs."""
    analysis: DocAnalysis | None = None
    """The cached question-independent analysis of `text` (token costs, term statistics)."""
    question_sentences: set[int] | None = None
    """Sentence ids sharing a search term with the question; None ranks every sentence alike."""
    struct_first: bool = True
    """Structural spans of a selected context rank ahead of its other words (tier 0, after the user's
    literals); False ranks them with their context (`ProtectionPolicy.rank_with_context`)."""
    struct_groups: list[int] | None = None
    """Index of the structural protected span each word belongs to (-1: none); words sharing one are
    kept or cut together. None on construction: each run of consecutive `struct_protected` words is
    one span."""

    def __post_init__(self) -> None:
        if self.struct_groups is None:
            runs, current = [], -1
            for w, flag in enumerate(self.struct_protected):
                if flag and (w == 0 or not self.struct_protected[w - 1]):
                    current += 1
                runs.append(current if flag else -1)
            self.struct_groups = runs

    def span_group(self, word: int) -> int:
        """The structural span a word belongs to, or -1 (none, or a user-protected word: mandatory,
        it stands alone). Words of one span are one unit of the keep order."""
        assert self.struct_groups is not None
        if self.user_protected[word] or not self.struct_protected[word]:
            return -1
        return self.struct_groups[word]

    def candidate(self, word: int) -> bool:
        """Whether the token stage ranks this word: forced, or in a sentence the filter keeps."""
        if self.forced(word):
            return True
        return self.selected and (self.sentence_kept is None or self.sentence_ids[word] in self.sentence_kept)

    def mandatory(self, word: int) -> bool:
        """Kept whatever the budget (the user's literals and patterns): the fit's floor."""
        return self.user_protected[word]

    def forced(self, word: int) -> bool:
        """Kept by the token stage whatever its scores: mandatory, or a structural span word of a
        selected context ranked ahead of it (`struct_first`)."""
        return self.user_protected[word] or (self.struct_first and self.selected and self.struct_protected[word])

    def priority(self, word: int) -> tuple[int, int, float, int, int]:
        """Sort key of one word in the global keep order (see the module docstring): (tier, group, key,
        rank, unit word). Words of one structural span share the span's best (tier, group, key) and
        its first word as unit word; `word` breaks ties inside the unit."""
        group = self.span_group(word)
        if group < 0:
            return (*self._own_priority(word), self.rank, word)
        members = [w for w in range(len(self.words)) if self.span_group(w) == group]
        return (*min(self._own_priority(w) for w in members), self.rank, members[0])

    def _own_priority(self, word: int) -> tuple[int, int, float]:
        """(tier, group, key) of a word by itself, before structural spans are made units."""
        if self.user_protected[word]:
            return (0, 0, 0.0)
        if not self.selected:
            return (3, 0, 0.0)
        if self.struct_first and self.struct_protected[word]:
            return (0, 1, 0.0)
        sentence = self.sentence_ids[word]
        group = 0 if self.question_sentences is None or sentence in self.question_sentences else 1
        if self.sentence_kept is not None and sentence not in self.sentence_kept:
            assert self.sentence_rank is not None
            return (1, group, _FILTERED + self.sentence_rank[sentence])
        if self.word_keys is not None:
            return (1, group, self.word_keys[word])
        # no token stage: whole sentences, best first, so the fit cuts the least relevant ones
        return (1, group, float(self.sentence_rank[sentence]) if self.sentence_rank else 0.0)

    def priority_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tier, group, key, unit word) of every word as arrays: `priority(w)` for all w at once (rank
        completes the key, the word itself breaks ties inside a unit). Equal to `priority`, computed
        without a Python loop over words."""
        tier, group, key = self._own_arrays()
        unit = np.arange(len(self.words), dtype=np.int64)
        struct = np.asarray(self.struct_protected, dtype=bool) & ~np.asarray(self.user_protected, dtype=bool)
        members = np.flatnonzero(struct)
        if members.size:
            spans = np.asarray(self.struct_groups, dtype=np.int64)[members]
            # the best member of each span: the first one sorted by span, then by (tier, group, key)
            by_span = np.lexsort((members, key[members], group[members], tier[members], spans))
            sorted_spans = spans[by_span]
            first = np.r_[True, sorted_spans[1:] != sorted_spans[:-1]]
            leader = np.zeros(int(spans.max()) + 1, dtype=np.int64)
            leader[sorted_spans[first]] = members[by_span][first]
            start = np.full(int(spans.max()) + 1, len(self.words), dtype=np.int64)
            np.minimum.at(start, spans, members)
            lead = leader[spans]
            tier[members], group[members], key[members] = tier[lead], group[lead], key[lead]
            unit[members] = start[spans]
        return tier, group, key, unit

    def _own_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tier, group, key) of every word by itself (`_own_priority` for all words)."""
        n = len(self.words)
        user = np.asarray(self.user_protected, dtype=bool)
        tier = np.ones(n, dtype=np.int64)
        group = np.zeros(n, dtype=np.int64)
        key = np.zeros(n, dtype=np.float64)
        if not self.selected:
            tier[:] = 3
            tier[user] = 0
            return tier, group, key
        sids = np.asarray(self.sentence_ids, dtype=np.int64)
        num_sentences = int(sids[-1]) + 1 if n else 0
        if self.question_sentences is not None:
            matches = np.zeros(num_sentences, dtype=bool)
            matches[[s for s in self.question_sentences if s < num_sentences]] = True
            group = np.where(matches[sids], 0, 1)
        rank = np.zeros(num_sentences, dtype=np.float64)
        if self.sentence_rank:
            for s, r in self.sentence_rank.items():
                if s < num_sentences:
                    rank[s] = r
        key = np.asarray(self.word_keys, dtype=np.float64) if self.word_keys is not None else rank[sids]
        if self.sentence_kept is not None:
            kept = np.zeros(num_sentences, dtype=bool)
            kept[[s for s in self.sentence_kept if s < num_sentences]] = True
            key = np.where(kept[sids], key, _FILTERED + rank[sids])
        tier[user] = 0
        group = np.where(user, 0, group)
        key = np.where(user, 0.0, key)
        if self.struct_first:
            struct = np.asarray(self.struct_protected, dtype=bool) & ~user
            tier[struct] = 0
            group = np.where(struct, 1, group)
            key = np.where(struct, 0.0, key)
        return tier, group, key


_FILTERED = 1e12  # filtered-out sentences come after every kept one of their group


@dataclass
class StageEnv:
    """What every stage may read: the scorer, the question, the target counter and the budget."""

    scorer: Backend | None
    """The scoring backend (None when only scorer-free stages run)."""
    question: str
    """The question the compression is conditioned on ("" for none)."""
    count_tokens: TokenCounter
    """Token counter of the target model."""
    config: CompressorConfig
    """Stage settings."""
    context_budget: int
    """Tokens available to all contexts together (target minus instruction, question, separators)."""
    costs: PromptCosts | None = None
    """Prompt token costs when every context has offsets; stages then price texts without counting."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage, filled by the compressor."""

    def tokens_of_words(self, plan: DocPlan, kept: list[int], text: str) -> int:
        """Tokens of `text` = the plan's words `kept` (ascending) joined by `words.join_words`:
        priced from the plan's analysis when it has offsets, counted otherwise."""
        a = plan.analysis
        if self.costs is not None and a is not None and a.has_offsets:
            return joined_tokens(a, kept, self.costs.space, self.costs.newline)
        return self.count_tokens(text)


class Stage(Protocol):
    """One compression stage. `run` mutates the plans in place; it never removes a plan."""

    name: str

    def run(self, plans: Sequence[DocPlan], env: StageEnv) -> None: ...
