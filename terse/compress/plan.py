"""The working state the stages share (`DocPlan`), the `Stage` protocol, and the keep-priority order.

Stages never delete text themselves. Each one refines, per context, which words are worth keeping
most, and the exact-fit stage then keeps words in that priority order until the budget is full:

    tier 0  protected words (user literals anywhere; structural spans in selected contexts)
    tier 1  words of selected contexts, in sentences the sentence filter keeps, by token key
            (by sentence rank when no token stage ran)
    tier 2  words of selected contexts in filtered-out sentences, best sentence first
    tier 3  words of contexts the coarse stage dropped, best context first

Within tier 1 the key is the token stage's `cumulative token share / keep ratio` of the word in its
segment (see `tokens.py`): below 1.0 means "kept under the planned per-context ratios", so moving one
global threshold scales every context's share in proportion: that is how the budget is spread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from terse.backend.base import Backend
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
    """Words overlapping structural protected spans: kept when the context is selected."""
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

    def protected(self, word: int) -> bool:
        return self.user_protected[word] or (self.selected and self.struct_protected[word])

    def priority(self, word: int) -> tuple[int, float, int, int]:
        """Sort key of one word in the global keep order (see the module docstring)."""
        if self.protected(word):
            return (0, 0.0, self.rank, word)
        if not self.selected:
            return (3, 0.0, self.rank, word)
        sentence = self.sentence_ids[word]
        if self.sentence_kept is not None and sentence not in self.sentence_kept:
            assert self.sentence_rank is not None
            return (2, float(self.sentence_rank[sentence]), self.rank, word)
        if self.word_keys is not None:
            return (1, self.word_keys[word], self.rank, word)
        # no token stage: whole sentences, best first, so the fit cuts the least relevant ones
        return (1, float(self.sentence_rank[sentence]) if self.sentence_rank else 0.0, self.rank, word)


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
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage, filled by the compressor."""


class Stage(Protocol):
    """One compression stage. `run` mutates the plans in place; it never removes a plan."""

    name: str

    def run(self, plans: Sequence[DocPlan], env: StageEnv) -> None: ...
