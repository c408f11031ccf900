"""Invariants every compression result must hold, checked the same way in every test."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from terse.compress import CompressionResult
from terse.compress.words import split_words


def words_of(text: str) -> list[str]:
    return [text[a:b] for a, b in split_words(text)]


def is_subsequence(sub: Sequence[str], seq: Sequence[str]) -> bool:
    it = iter(seq)
    return all(any(x == y for y in it) for x in sub)


def check_result(
    result: CompressionResult, docs: Sequence[str], count: Callable[[str], int], *, slack: int | None = 3
) -> None:
    """Budget met exactly in the real tokenizer; whole input words, in order; spans map back."""
    assert result.num_compressed_tokens == count(result.text)
    assert result.num_compressed_tokens <= result.target_tokens
    if slack is not None and result.num_original_tokens > result.target_tokens:
        assert result.target_tokens - result.num_compressed_tokens <= slack, (
            result.target_tokens, result.num_compressed_tokens)
    for i, doc in enumerate(docs):
        assert is_subsequence(words_of(result.contexts[i]), words_of(doc))
    for span in result.spans:
        original = docs[span.context_index][span.start : span.end]
        assert result.text[span.output_start : span.output_end] == original
    # spans of one context are in original order and do not overlap
    for i in range(len(docs)):
        mine = [s for s in result.spans if s.context_index == i]
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))
