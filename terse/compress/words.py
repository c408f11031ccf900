"""Word and sentence segmentation: the units the compressor keeps or deletes.

A word is a maximal run of non-space characters in space-delimited scripts. Runs of CJK text (Han,
kana, CJK punctuation, full-width forms), which put no spaces between words, are cut into words by
a segmenter (`segment.py`: jieba for Chinese, janome for Japanese, numerals whole), never into
single characters. Deleting only whole words means nothing is ever broken mid-word or mid-number.

Joining kept words (`join_words`): two kept words that were neighbours keep the original whitespace
between them exactly (indentation, newlines); across a deletion the gap becomes one newline when the
deleted stretch held one, a space when it held any whitespace, and nothing between CJK characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from terse.compress.segment import segment_cjk

# Han (incl. extensions A and compatibility), hiragana, katakana, CJK symbols/punctuation, full-width forms.
_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
# a digit run with a CJK date / amount suffix (1958年, 5月, 300万) is one word; then CJK runs; then the rest
_WORD_RE = re.compile(rf"\d+(?:[.,]\d+)*[年月日号號時时分秒万萬亿億]|[{_CJK}]+|[^\s{_CJK}]+")
_CJK_RE = re.compile(rf"[{_CJK}]")
_SENTENCE_END_RE = re.compile(r"[.!?。！？…]['\")\]»”’]*$")


class Span(NamedTuple):
    """A half-open character span [start, end) of some text."""

    start: int
    end: int


def split_words(text: str) -> list[Span]:
    """The words of `text` in order, as character spans (whitespace belongs to no word)."""
    if _CJK_RE.search(text) is None:
        return [Span(m.start(), m.end()) for m in _WORD_RE.finditer(text)]
    words: list[Span] = []
    for m in _WORD_RE.finditer(text):
        start = m.start()
        if _CJK_RE.match(text, start) and not m.group(0)[0].isdigit():
            words.extend(Span(start + a, start + b) for a, b in segment_cjk(m.group(0)))
        else:
            words.append(Span(start, m.end()))
    return words


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
