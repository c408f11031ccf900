"""From the scorer's per-token log-probabilities to per-word surprisal, and segments that fit its window."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from terse.backend.types import TokenScores
from terse.compress.words import Span


@dataclass(frozen=True)
class WordStats:
    """Per-word figures of one scored text (indexed like the word spans given)."""

    surprisal: list[float]
    """Mean -log P of the tokens overlapping each word (nats per token; higher = more informative)."""
    num_tokens: list[float]
    """Scorer tokens per word (a token shared by k words counts 1/k to each)."""


def word_stats(scores: TokenScores, words: Sequence[Span]) -> WordStats:
    """Spread token surprisal over the words it overlaps (both in the scored text's coordinates).

    A token without a log-probability (NaN: the first token with no BOS to condition on) counts as the
    mean surprisal of the others, so the first word is neither favoured nor penalised.
    """
    known = [-lp for lp in scores.logprobs if not math.isnan(lp)]
    fallback = sum(known) / len(known) if known else 0.0
    total = [0.0] * len(words)
    count = [0.0] * len(words)
    first = 0
    for lp, (start, end) in zip(scores.logprobs, scores.offsets):
        if end <= start:
            continue  # special tokens carry no text
        while first < len(words) and words[first].end <= start:
            first += 1
        last = first
        while last < len(words) and words[last].start < end:
            last += 1
        k = last - first
        if k == 0:
            continue  # whitespace-only token: its surprisal belongs to no word
        value = fallback if math.isnan(lp) else -lp
        for w in range(first, last):
            total[w] += value / k
            count[w] += 1.0 / k
    surprisal = [t / c if c else fallback for t, c in zip(total, count)]
    return WordStats(surprisal, [max(c, 1e-3) for c in count])


def segment_bounds(words: Sequence[Span], num_tokens_estimate: float, segment_tokens: int) -> list[tuple[int, int]]:
    """Split word indices [0, len(words)) into consecutive (first, last) ranges of ~segment_tokens tokens.

    `num_tokens_estimate` is the token count of the whole text the words span; the split is by
    characters at that density, so segments land near the size without tokenizing each one.
    """
    if not words:
        return []
    num_chars = max(1, words[-1].end - words[0].start)
    chars_per_segment = max(1.0, segment_tokens * num_chars / max(1.0, num_tokens_estimate))
    bounds: list[tuple[int, int]] = []
    first = 0
    for i in range(1, len(words) + 1):
        if i == len(words) or words[i].end - words[first].start > chars_per_segment:
            bounds.append((first, i))
            first = i
    return bounds


def keys_for_segment(surprisal: Sequence[float], num_tokens: Sequence[float], protected: Sequence[bool], ratio: float) -> list[float]:
    """Keep-priority keys of one segment's words (lower = keep first; protected words get 0.0).

    The segment should keep `ratio` of its tokens. Protected tokens come off that share first; the
    rest are ranked by surprisal, and a word's key is the token share ranked above it divided by the
    share left for them, so words with key < 1 are exactly those kept under the plan.
    """
    num_total = sum(num_tokens)
    num_protected = sum(n for n, p in zip(num_tokens, protected) if p)
    num_free = num_total - num_protected
    available = max(0.0, ratio * num_total - num_protected)
    share = max(available / num_free, 1e-3) if num_free > 0 else 1.0
    keys = [0.0] * len(surprisal)
    order = sorted((i for i in range(len(surprisal)) if not protected[i]), key=lambda i: -surprisal[i])
    above = 0.0
    for i in order:
        keys[i] = (above / num_free) / share
        above += num_tokens[i]
    return keys
