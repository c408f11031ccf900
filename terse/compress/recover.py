"""`recover`: map a response that quotes the compressed prompt back to the original wording.

A model answering from a compressed prompt quotes compressed text ("Acme Corp Paris office 42"):
gaps where words were deleted. Compressed words are whole original words in order, so each maps to
one original word (greedy in-order alignment). Every run of at least `min_run` response words that
equals a run of consecutive compressed words is replaced by the original text from the first to the
last word of that run, deleted words and original whitespace included. Words match with trailing
punctuation ignored ("2019." quotes "2019"); the response keeps its own trailing punctuation.
"""

from __future__ import annotations

import string
from collections import defaultdict

from terse.compress.words import split_words


def recover(original: str, compressed: str, response: str, *, min_run: int = 2) -> str:
    """`response` with quoted compressed spans expanded to the original spans they came from."""
    if min_run < 1:
        raise ValueError(f"min_run={min_run} must be >= 1 (2 avoids expanding lone common words)")
    o_words = split_words(original)
    c_words = split_words(compressed)
    r_words = split_words(response)
    o_text = [_bare(original[a:b]) for a, b in o_words]
    c_text = [_bare(compressed[a:b]) for a, b in c_words]
    r_text = [_bare(response[a:b]) for a, b in r_words]
    to_original = _align(c_text, o_text)
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
            pieces.append(response[pos : r_words[i].start])
            pieces.append(original[o_words[first].start : o_words[last].start + len(o_text[last])])
            pos = r_words[i + length - 1].start + len(r_text[i + length - 1])
            i += length
        else:
            i += 1
    pieces.append(response[pos:])
    return "".join(pieces)


def _bare(word: str) -> str:
    """The word without trailing punctuation (a word of punctuation only stays as it is)."""
    return word.rstrip(_TRAILING) or word


_TRAILING = string.punctuation + "。、！？…»”’"


def _align(c_text: list[str], o_text: list[str]) -> list[int]:
    """Original word index of each compressed word (-1 when it is not found in order)."""
    out: list[int] = []
    j = 0
    for word in c_text:
        k = j
        while k < len(o_text) and o_text[k] != word:
            k += 1
        if k < len(o_text):
            out.append(k)
            j = k + 1
        else:
            out.append(-1)  # not from the original (e.g. a separator); the next search starts where it was
    return out


def _longest_run(
    r_text: list[str], i: int, c_text: list[str], starts: list[int], to_original: list[int]
) -> tuple[int, int]:
    """(start in compressed, length) of the longest aligned compressed run equal to r_text[i:]."""
    best = (0, 0)
    for k in starts:
        length = 0
        while (
            i + length < len(r_text)
            and k + length < len(c_text)
            and r_text[i + length] == c_text[k + length]
            and to_original[k + length] >= 0
            and (length == 0 or to_original[k + length] > to_original[k + length - 1])
        ):
            length += 1
        if length > best[1]:
            best = (k, length)
    return best
