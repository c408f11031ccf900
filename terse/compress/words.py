"""Word and sentence segmentation: the units the compressor keeps or deletes.

A word is a maximal run of non-space characters in space-delimited scripts; each CJK character (Han,
kana, CJK punctuation, full-width forms) is a word of its own, since those scripts put no spaces
between words. Deleting only whole words means nothing is ever broken mid-token or mid-number.

Joining kept words (`join_words`): two kept words that were neighbours keep the original whitespace
between them exactly (indentation, newlines); across a deletion the gap becomes one newline when the
deleted stretch held one, a space when it held any whitespace, and nothing between CJK characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

# Han (incl. extensions A and compatibility), hiragana, katakana, CJK symbols/punctuation, full-width forms.
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_SENTENCE_END_RE = re.compile(r"[.!?。！？…]['\")\]»”’]*$")


class Span(NamedTuple):
    """A half-open character span [start, end) of some text."""

    start: int
    end: int


def split_words(text: str) -> list[Span]:
    """The words of `text` in order, as character spans (whitespace belongs to no word)."""
    return [Span(m.start(), m.end()) for m in _WORD_RE.finditer(text)]


def sentence_ids(text: str, words: Sequence[Span]) -> list[int]:
    """Sentence number of every word: a sentence ends after terminal punctuation or at a line break."""
    ids: list[int] = []
    sentence = 0
    for i, (start, end) in enumerate(words):
        ids.append(sentence)
        next_start = words[i + 1].start if i + 1 < len(words) else len(text)
        gap = text[end:next_start]
        if "\n" in gap or (_SENTENCE_END_RE.search(text[start:end]) and (gap or end - start == 1)):
            sentence += 1
    return ids


def join_words(text: str, words: Sequence[Span], kept: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Join the kept words (indices into `words`, ascending) of `text`.

    Returns the joined string and, for every kept word, its (start, end) in that string.
    """
    pieces: list[str] = []
    out_spans: list[tuple[int, int]] = []
    pos = 0
    prev = -1
    for index in kept:
        start, end = words[index]
        if prev >= 0:
            prev_end = words[prev].end
            if index == prev + 1:
                sep = text[prev_end:start]
            else:
                sep = _gap_separator(text[prev_end:start])
            pieces.append(sep)
            pos += len(sep)
        pieces.append(text[start:end])
        out_spans.append((pos, pos + end - start))
        pos += end - start
        prev = index
    return "".join(pieces), out_spans


def _gap_separator(deleted: str) -> str:
    """What stands for a deleted stretch: a newline if it held one, a space if it held whitespace."""
    if "\n" in deleted:
        return "\n"
    if any(ch.isspace() for ch in deleted):
        return " "
    return ""  # only CJK characters were deleted: those scripts put no spaces between words
