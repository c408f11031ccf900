"""Typed, validated configuration of the compressor: the budget, the protection policy, the stages.

Every object is a frozen dataclass checked on construction, so a bad value fails where it was written
with a `ConfigError` naming the value, the limit and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from terse.errors import ConfigError
from terse.validation import check_choice, check_int, check_range, check_strings, require

Reorder = Literal["original", "rank", "ends"]
TokenPrunerName = Literal["iterative", "parallel"]


@dataclass(frozen=True)
class Budget:
    """How long the compressed prompt may be, measured in the target model's tokenizer.

    Give exactly one of `target_tokens` or `rate`. A target covers the whole returned prompt
    (instruction, compressed contexts and question, as `CompressionResult.text` holds them); a rate
    applies to the compressible part, with the verbatim parts (instruction, question) added on top.
    """

    target_tokens: int | None = None
    """Most tokens the compressed prompt may hold (>= 1)."""
    rate: float | None = None
    """Fraction of the contexts' tokens to keep, in (0, 1]:
    target = fixed + floor(rate * (original - fixed)), where fixed counts the verbatim parts."""

    one_of: ClassVar[tuple[str, ...]] = ("target_tokens", "rate")
    """Fields of which exactly one is set: data that sets one of them clears the other
    (`terse.config_data`)."""

    def __post_init__(self) -> None:
        require(
            (self.target_tokens is None) != (self.rate is None),
            f"Budget(target_tokens={self.target_tokens!r}, rate={self.rate!r}): give exactly one of "
            f"target_tokens and rate, e.g. Budget(rate=0.25) or Budget(target_tokens=300)",
        )
        if self.target_tokens is not None:
            check_int("target_tokens", self.target_tokens, low=1, example=300)
        if self.rate is not None:
            check_range("rate", self.rate, 0.0, 1.0, low_open=True, example="0.25 (keeps a quarter)")

    def resolve(self, num_original_tokens: int, num_fixed_tokens: int = 0) -> int:
        """The target for a prompt of `num_original_tokens`, `num_fixed_tokens` of them kept verbatim."""
        if self.target_tokens is not None:
            return self.target_tokens
        assert self.rate is not None
        num_compressible = max(0, num_original_tokens - num_fixed_tokens)
        return max(1, num_fixed_tokens + math.floor(self.rate * num_compressible))


@dataclass(frozen=True)
class ProtectionPolicy:
    """Spans that are never cut: kept whole, with their inner whitespace, wherever they are kept.

    `literals` and `patterns` are kept wherever they occur, even inside contexts the coarse stage drops:
    they are mandatory. The structural flags make spans atomic: each span is kept whole or not at all,
    never cut inside. By default the spans of the contexts that survive the coarse stage are kept ahead
    of every other word of those contexts (the spans of the best contexts first while they do not all
    fit), so a number stays even where the budget cuts its sentence; with `rank_with_context` a span
    ranks as its best word, with its sentence and context, and goes with a sentence the budget cuts.
    `ProtectionPolicy.standard()` is what the CLI and the chat hook use.
    """

    literals: tuple[str, ...] = ()
    """Exact substrings to keep (every occurrence), e.g. ("Acme Corp", "ORDER-7731"). Mandatory: a
    prompt whose verbatim parts and literals exceed the target is refused."""
    patterns: tuple[str, ...] = ()
    """Regular expressions whose matches are kept (Python `re` syntax), e.g. (r"[A-Z]{3}-\\d+",)."""
    numbers: bool = False
    """Keep numbers, numeric dates, versions and amounts (digit runs, with a CJK date or amount suffix
    such as 1958年), and CJK numerals (一九五八年, 一千五百万)."""
    code_blocks: bool = False
    """Keep fenced code blocks (```...```) and `inline code` whole."""
    json_keys: bool = False
    """Keep JSON object keys ("key":) so structured data stays parseable by eye."""
    role_labels: bool = False
    """Keep role labels at line starts (User:, Assistant:, System:, Q:, A:, Question:, Answer:)."""
    markdown: bool = False
    """Keep markdown structure: heading lines, list bullets, table pipes, block quotes, rules."""
    dates: bool = False
    """Keep dates written with month names ("May 5, 2019", "5 March 2020", "June 2021")."""
    urls: bool = False
    """Keep URLs (scheme://... or www....), without trailing punctuation."""
    emails: bool = False
    """Keep e-mail addresses."""
    rank_with_context: bool = False
    """Rank structural spans with their sentence instead of ahead of it: no lone numbers in the result
    where a sentence was cut, at the price of the facts those sentences held. On the chat-layout bench
    (4x, 105 questions of test worlds 6-9) both orders answered alike (-0.7 points pooled over four
    layouts, 95% CI [-2.6, +1.2]) and spans first kept the gold answer in 99-100% of the prompts
    against 95%: spans first is the default."""

    def __post_init__(self) -> None:
        for name in ("literals", "patterns"):
            check_strings(name, getattr(self, name), example=f"{name}=('x',)")
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"protect pattern {pattern!r} is not a valid regex ({e}); fix or escape it") from e

    @classmethod
    def everything(cls, literals: tuple[str, ...] = (), patterns: tuple[str, ...] = ()) -> ProtectionPolicy:
        """Every structural flag on: for prompts holding code, data or transcripts."""
        return cls(literals, patterns, numbers=True, code_blocks=True, json_keys=True, role_labels=True,
                   markdown=True, dates=True, urls=True, emails=True)

    @classmethod
    def standard(cls, literals: tuple[str, ...] = (), patterns: tuple[str, ...] = ()) -> ProtectionPolicy:
        """The default of `terse compress` and the chat hook: numbers (CJK numerals included), dates,
        URLs, e-mail addresses, code spans and fences: the facts answers are made of. Switch single
        ones off with `dataclasses.replace(policy, urls=False)`."""
        return cls(literals, patterns, numbers=True, code_blocks=True, dates=True, urls=True, emails=True)


@dataclass(frozen=True)
class CompressorConfig:
    """Which stages run and how. Stages are chosen by registry name; None switches a stage off."""

    ranker: str | None = "bm25"
    """Coarse context ranker: "bm25" (lexical, nearly free), "lm" (mean log P(question | context) from the
    scorer: one extra pass over every context), "embedding" (MiniLM cosine), or None (input order)."""
    reorder: Reorder = "rank"
    """Output order of contexts: "original", "rank" (best first) or "ends" (best at both ends)."""
    context_budget_ratio: float = 1.4
    """The coarse stage keeps contexts (best first) until their tokens reach this multiple of the budget."""
    dynamic_ratio_spread: float = 0.3
    """How much keep ratios vary by rank: the best context keeps (1 + spread) x the mean ratio, the worst
    (1 - spread) x; 0 gives every kept context the same ratio. In [0, 1)."""
    sentence_ranker: str | None = "bm25"
    """Sentence filter ranker name, "same" for the coarse ranker ("lm" when that is None), or None (off)."""
    sentence_budget_ratio: float = 2.0
    """The sentence filter keeps each context's best sentences up to this multiple of its token share."""
    token_pruner: TokenPrunerName | None = "parallel"
    """Token-level stage: "parallel" (all segments conditioned on the question, in batched calls),
    "iterative" (segments conditioned on question + kept text, prefix reused), or None (off). On the
    doc-QA benchmark both gave the same accuracy at 2x, 4x and 8x; parallel was 2.1-2.9x faster on GPU."""
    keep_question_terms: bool = True
    """Token stage: rank words that share a term with the question (names, key nouns) above all others;
    conditioned on the question they look predictable, yet they are what ties a context to it."""
    question_sentences_first: bool = True
    """Within the selected contexts, keep every word of a sentence that shares a search term with the
    question (or `condition`) before any word of a sentence that shares none: filler is always cut
    first, whatever the rankers and the token stage make of it."""
    segment_tokens: int = 128
    """Scorer tokens per segment of the token-level stage."""
    max_prefix_tokens: int = 1024
    """Most tokens of kept text carried as the scoring prefix; older kept text is left out past it."""
    fit_max_probes: int = 64
    """Most extra tokenizer probes the exact-fit stage spends filling the last few tokens of budget."""
    context_separator: str = "\n\n"
    """Joins compressed contexts, and the instruction / contexts / question parts of the prompt."""
    embedding_model: str | None = None
    """Sentence-transformers model dir for the "embedding" ranker; None means the bundled MiniLM."""

    def __post_init__(self) -> None:
        check_choice("reorder", self.reorder, ("original", "rank", "ends"))
        check_choice("token_pruner", self.token_pruner, ("iterative", "parallel", None))
        check_range("context_budget_ratio", self.context_budget_ratio, 1.0, 100.0, example=1.4)
        check_range("sentence_budget_ratio", self.sentence_budget_ratio, 1.0, 100.0, example=2.0)
        check_range("dynamic_ratio_spread", self.dynamic_ratio_spread, 0.0, 0.99, example=0.3)
        for name, low in (("segment_tokens", 8), ("max_prefix_tokens", 0), ("fit_max_probes", 0)):
            check_int(name, getattr(self, name), low=low)
        require(self.context_separator != "", "context_separator='' would glue contexts together; use e.g. '\\n\\n'")

    def resolved_sentence_ranker(self) -> str | None:
        """The sentence filter's ranker name after resolving "same"."""
        if self.sentence_ranker == "same":
            return self.ranker or "lm"
        return self.sentence_ranker

    def calls_model(self) -> bool:
        """Whether a stage scores with the model (the "lm" ranker, coarse or for sentences, or a token
        pruner): a compressor with this config needs a scorer Backend."""
        return "lm" in (self.ranker, self.resolved_sentence_ranker()) or self.token_pruner is not None

