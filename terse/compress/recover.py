"""`recover`: map a response that quotes the compressed prompt back to the original wording.

A model answering from a compressed prompt quotes compressed text ("Acme Corp Paris office 42"):
gaps where words were deleted. Every compressed word is one original word, so each is mapped to
its place in the original; every run of at least `min_run` response words equal to consecutive
compressed words that come, in order, from one context is replaced by that context's text from the
first to the last word of the run (deleted words and original whitespace included). Words match with
trailing punctuation ignored ("2019." quotes "2019"); the response keeps its own trailing punctuation.

Where each compressed word came from:
- from a `CompressionResult` (its `spans` map every kept piece to its context and offsets): exact,
  for any number of contexts in any output order, repeated words included;
- from two strings (one context, in order): aligned, each compressed word to the occurrence of its
  word that lies between where the words before it and the words after it can be, as close to its
  successor as possible (so "the mat" from "the cat sat on the mat" maps to the second "the").
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

from terse.compress.result import CompressionResult
from terse.compress.words import Span, split_words
from terse.errors import ConfigError

_TRAILING = string.punctuation + "。、！？…»”’"


class _Origin(NamedTuple):
    context: int
    word: int


def recover(
    original: str | Sequence[str], compressed: str | CompressionResult, response: str, *, min_run: int = 2
) -> str:
    """`response` with quoted compressed spans expanded to the original spans they came from.

    `original` is the uncompressed context (a string) or the contexts given to the compressor (a
    list); `compressed` is the compressed text, or the `CompressionResult` (needed for several
    contexts: it says which context every kept piece came from).
    """
    if min_run < 1:
        raise ValueError(f"min_run={min_run} must be >= 1 (2 avoids expanding lone common words)")
    contexts = [original] if isinstance(original, str) else list(original)
    o_words = [split_words(c) for c in contexts]
    if isinstance(compressed, CompressionResult):
        c_text_full = compressed.text
        c_words = split_words(c_text_full)
        to_original = _from_spans(compressed, c_words, o_words)
    else:
        if len(contexts) != 1:
            raise ConfigError("recover() over several contexts needs the CompressionResult (its spans say which "
                              "context each piece came from); pass result, not result.text")
        c_text_full = compressed
        c_words = split_words(compressed)
        to_original = _aligned([_bare(compressed[a:b]) for a, b in c_words],
                               [_bare(contexts[0][a:b]) for a, b in o_words[0]])
    c_text = [_bare(c_text_full[a:b]) for a, b in c_words]
    r_words = split_words(response)
    r_text = [_bare(response[a:b]) for a, b in r_words]
    positions: dict[str, list[int]] = defaultdict(list)
    for k, word in enumerate(c_text):
        positions[word].append(k)
    pieces: list[str] = []
    pos = 0
    i = 0
    while i < len(r_text):
        k, length = _longest_run(r_text, i, c_text, positions.get(r_text[i], []), to_original)
        if length >= min_run:
            first, last = to_original[k], to_original[k + length - 1]
            assert first is not None and last is not None
            text, words = contexts[first.context], o_words[first.context]
            last_word = text[words[last.word].start : words[last.word].end]
            pieces.append(response[pos : r_words[i].start])
            pieces.append(text[words[first.word].start : words[last.word].start + len(_bare(last_word))])
            pos = r_words[i + length - 1].start + len(r_text[i + length - 1])
            i += length
        else:
            i += 1
    pieces.append(response[pos:])
    return "".join(pieces)


def _bare(word: str) -> str:
    """The word without trailing punctuation (a word of punctuation only stays as it is)."""
    return word.rstrip(_TRAILING) or word


def _from_spans(result: CompressionResult, c_words: Sequence[Span], o_words: Sequence[Sequence[Span]]
                ) -> list[_Origin | None]:
    """Origin of each compressed word from the result's kept spans (None: instruction, question)."""
    if any(s.context_index >= len(o_words) for s in result.spans):
        raise ConfigError(f"the result has {max(s.context_index for s in result.spans) + 1} contexts; "
                          f"pass the same list of contexts that was compressed")
    starts = [{w.start: j for j, w in enumerate(words)} for words in o_words]
    spans = sorted(result.spans, key=lambda s: s.output_start)
    out: list[_Origin | None] = []
    j = 0
    for start, _ in c_words:
        while j < len(spans) and spans[j].output_end <= start:
            j += 1
        span = spans[j] if j < len(spans) and spans[j].output_start <= start else None
        word = None if span is None else starts[span.context_index].get(span.start + start - span.output_start)
        out.append(None if span is None or word is None else _Origin(span.context_index, word))
    return out


def _aligned(c_text: Sequence[str], o_text: Sequence[str]) -> list[_Origin | None]:
    """Original word of each compressed word, one context in order (see the module docstring)."""
    occurrences: dict[str, list[int]] = defaultdict(list)
    for j, word in enumerate(o_text):
        occurrences[word].append(j)
    # earliest feasible position of each word, left to right (-1: not from the original)
    earliest: list[int] = []
    floor = 0
    for word in c_text:
        j = _first_at_least(occurrences.get(word, []), floor)
        earliest.append(j)
        if j >= 0:
            floor = j + 1
    # right to left: the latest occurrence at or after the earliest one and before the successor
    chosen = [-1] * len(c_text)
    ceiling = len(o_text)
    for k in range(len(c_text) - 1, -1, -1):
        if earliest[k] < 0:
            continue
        j = _last_below(occurrences[c_text[k]], ceiling)
        chosen[k] = j if j >= earliest[k] else earliest[k]
        ceiling = chosen[k]
    return [_Origin(0, j) if j >= 0 else None for j in chosen]


def _first_at_least(sorted_positions: list[int], floor: int) -> int:
    from bisect import bisect_left

    i = bisect_left(sorted_positions, floor)
    return sorted_positions[i] if i < len(sorted_positions) else -1


def _last_below(sorted_positions: list[int], ceiling: int) -> int:
    from bisect import bisect_left

    i = bisect_left(sorted_positions, ceiling)
    return sorted_positions[i - 1] if i > 0 else -1


def _longest_run(
    r_text: list[str], i: int, c_text: list[str], starts: list[int], to_original: list[_Origin | None]
) -> tuple[int, int]:
    """(start in compressed, length) of the longest run of compressed words equal to r_text[i:] whose
    origins are increasing words of one context."""
    best = (0, 0)
    for k in starts:
        length = 0
        while (
            i + length < len(r_text)
            and k + length < len(c_text)
            and r_text[i + length] == c_text[k + length]
            and to_original[k + length] is not None
            and (length == 0 or _follows(to_original[k + length - 1], to_original[k + length]))
        ):
            length += 1
        if length > best[1]:
            best = (k, length)
    return best


def _follows(a: _Origin | None, b: _Origin | None) -> bool:
    return a is not None and b is not None and a.context == b.context and b.word > a.word
