"""Typed results of compression: the text, where every kept piece came from, counts, ranks, timings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KeptSpan:
    """One contiguous piece of an original context that survives in the compressed text."""

    context_index: int
    """Index of the context (in the caller's list) the piece comes from."""
    start: int
    """Start character of the piece in that original context."""
    end: int
    """End character (exclusive) in that original context."""
    output_start: int
    """Start character of the piece in `CompressionResult.text`."""
    output_end: int
    """End character (exclusive) in `CompressionResult.text`."""


@dataclass(frozen=True)
class ContextReport:
    """What happened to one input context."""

    index: int
    """Index of the context in the caller's list."""
    rank: int
    """0 = judged most relevant to the question by the coarse ranker (input order without a ranker)."""
    score: float
    """The ranker's score (higher = more relevant); 0.0 without a ranker."""
    num_original_tokens: int
    """Tokens of the original context, in the target tokenizer."""
    num_kept_tokens: int
    """Tokens of what is kept of it, in the target tokenizer (0 when dropped)."""

    @property
    def kept_ratio(self) -> float:
        """num_kept_tokens / num_original_tokens (1.0 for an empty context)."""
        return self.num_kept_tokens / self.num_original_tokens if self.num_original_tokens else 1.0


@dataclass(frozen=True)
class CompressionResult:
    """The compressed prompt and its accounting. Counts are in the target model's tokenizer."""

    text: str
    """The compressed prompt: instruction, compressed contexts and question, joined by the separator."""
    contexts: tuple[str, ...]
    """Compressed text of each context, indexed like the input ("" when dropped)."""
    context_order: tuple[int, ...]
    """Indices of the contexts in the order they appear in `text` (dropped ones left out)."""
    spans: tuple[KeptSpan, ...]
    """Kept pieces of the contexts, in output order, mapped to the original and to `text`."""
    num_original_tokens: int
    """Tokens of the uncompressed prompt (same parts, same separator)."""
    num_compressed_tokens: int
    """Tokens of `text`; never more than `target_tokens`."""
    target_tokens: int
    """The budget the result was fitted to."""
    reports: tuple[ContextReport, ...]
    """One report per input context, indexed like the input."""
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    """Seconds spent per stage ("coarse", "sentence", "token", "fit", "total")."""

    @property
    def rate(self) -> float:
        """num_compressed_tokens / num_original_tokens."""
        return self.num_compressed_tokens / self.num_original_tokens if self.num_original_tokens else 1.0

    @property
    def ratio(self) -> float:
        """Compression ratio, original / compressed tokens (e.g. 4.0 for "4x")."""
        return self.num_original_tokens / max(1, self.num_compressed_tokens)
