"""One analysis per context text, computed once and cached: words, sentences, search terms, token costs.

Documents recur across the questions of a job, so everything about a context that does not depend
on the question is derived once from its text and one tokenization in the target tokenizer:

    text      Lirois   was   founded   in   1958.\\n\\nThe   ...
    words     [0,6)    [7,10) ...                           (words.split_words)
    tokens    L ir ois Ġ was Ġ found ed Ġ in Ġ 1958 . Ċ Ċ The   (target tokenizer, with offsets)
    word_tokens   3    1      2 ...      tokens whose last character lies inside the word
    gap_tokens    0    1      1 ...      tokens whose last character lies in the whitespace before it

A token belongs to the word its last character falls in, or to the next word when it falls in
whitespace, so `sum(word_tokens) + sum(gap_tokens) + tail_tokens == num_tokens`. The exact-fit stage
prices any subset of words from these counts (`fit_model.py`); sentence token counts and BM25
statistics come from the same pass. Without offsets (a bare counter) the token fields are None.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from terse.compress.rankers import terms
from terse.compress.tokenizer import TargetTokenizer, TokenSpans
from terse.compress.words import Span, sentence_ids, split_words

_NEWLINE = "\n"


@dataclass
class DocAnalysis:
    """Question-independent facts about one context text (read-only once built)."""

    text: str
    words: list[Span]
    """Its words (see `words.split_words`)."""
    sentence_ids: list[int]
    """Sentence number of each word."""
    sentence_spans: dict[int, tuple[int, int]]
    """Sentence id -> (start, end) characters, first word start to last word end, in reading order."""
    sentence_terms: list[Counter[str]]
    """Search terms (`rankers.terms`) of each sentence, indexed by sentence id."""
    sentence_num_terms: list[int]
    """Number of terms of each sentence (its BM25 length)."""
    doc_terms: Counter[str]
    """Search terms of the whole text."""
    doc_num_terms: int
    """Number of terms of the whole text."""
    num_tokens: int
    """Tokens of the text in the target tokenizer."""
    word_tokens: list[int] | None = None
    """Tokens whose last character lies inside each word; None without offsets."""
    gap_tokens: list[int] | None = None
    """Tokens whose last character lies in the whitespace before each word; None without offsets."""
    sentence_tokens: dict[int, int] | None = None
    """Tokens of each sentence's span (as `count_tokens(text[start:end])` gives when no token
    crosses its edges); None without offsets."""
    gap_newlines: list[int] = field(default_factory=list)
    """Prefix counts: gap_newlines[i] = number of gaps before words < i that hold a newline."""
    gap_spaces: list[int] = field(default_factory=list)
    """Prefix counts: gap_spaces[i] = number of non-empty gaps before words < i."""
    protected: dict[Any, tuple[list[bool], list[int]]] = field(default_factory=dict)
    """Cache per protection policy: (user-protected flag, structural span group or -1) of each word."""
    edges_split: dict[str, bool] = field(default_factory=dict)
    """Cache: separator -> whether the tokenizer splits it from this text's edges (see compressor)."""

    @property
    def has_offsets(self) -> bool:
        return self.word_tokens is not None

    def gap_text(self, word: int) -> str:
        """The whitespace between word-1 and `word` ("" before the first word)."""
        if word == 0:
            return ""
        return self.text[self.words[word - 1].end : self.words[word].start]


def analyze(text: str, tokenizer: TargetTokenizer, token_spans: TokenSpans | None = None) -> DocAnalysis:
    """Build the analysis of `text`: one tokenization (or `token_spans`, the tokenizer's spans of
    `text` taken earlier), one word split, one pass for terms."""
    words = split_words(text)
    sids = sentence_ids(text, words)
    spans: dict[int, tuple[int, int]] = {}
    for word, sentence in zip(words, sids):
        start = spans[sentence][0] if sentence in spans else word.start
        spans[sentence] = (start, word.end)
    sentence_terms = [Counter(terms(text[a:b])) for a, b in spans.values()]
    doc_terms: Counter[str] = Counter()
    for c in sentence_terms:
        doc_terms.update(c)
    nl, sp = [0], [0]
    prev_end = 0
    for start, end in words:
        nl.append(nl[-1] + (_NEWLINE in text[prev_end:start]))
        sp.append(sp[-1] + (start > prev_end))
        prev_end = end
    if token_spans is None:
        token_spans = tokenizer.spans(text)
    analysis = DocAnalysis(
        text=text, words=words, sentence_ids=sids, sentence_spans=spans, sentence_terms=sentence_terms,
        sentence_num_terms=[sum(c.values()) for c in sentence_terms], doc_terms=doc_terms,
        doc_num_terms=sum(doc_terms.values()),
        num_tokens=len(token_spans) if token_spans is not None else tokenizer.count(text),
        gap_newlines=nl, gap_spaces=sp,
    )
    if token_spans is not None and words:
        _attach_token_costs(analysis, token_spans)
    elif token_spans is not None:
        analysis.word_tokens, analysis.gap_tokens, analysis.sentence_tokens = [], [], {}
    return analysis


def _attach_token_costs(analysis: DocAnalysis, token_spans: list[tuple[int, int]]) -> None:
    words = analysis.words
    # anchors: the last character of every token that carries text
    ends = np.fromiter((e for s, e in token_spans if e > s), dtype=np.int64)
    anchors = ends - 1
    word_starts = np.fromiter((w.start for w in words), dtype=np.int64, count=len(words))
    word_ends = np.fromiter((w.end for w in words), dtype=np.int64, count=len(words))
    owner = np.searchsorted(word_ends, anchors, side="right")  # first word ending after the anchor
    in_doc = owner < len(words)
    inside = np.zeros(len(anchors), dtype=bool)
    inside[in_doc] = anchors[in_doc] >= word_starts[owner[in_doc]]
    word_tokens = np.bincount(owner[inside], minlength=len(words))[: len(words)]
    gap_tokens = np.bincount(owner[in_doc & ~inside], minlength=len(words))[: len(words)]
    # tokens without text (specials) count toward the total but belong to no word: spread onto the gaps
    num_empty = len(token_spans) - len(ends)
    if num_empty:
        gap_tokens[0] += num_empty
    analysis.word_tokens = word_tokens.tolist()
    analysis.gap_tokens = gap_tokens.tolist()
    sids = np.asarray(analysis.sentence_ids, dtype=np.int64)
    first_of_sentence = np.ones(len(words), dtype=bool)
    first_of_sentence[1:] = sids[1:] != sids[:-1]
    per_word = word_tokens + np.where(first_of_sentence, 0, gap_tokens)
    totals = np.bincount(sids, weights=per_word, minlength=int(sids[-1]) + 1)
    analysis.sentence_tokens = {s: int(totals[s]) for s in analysis.sentence_spans}


@dataclass(frozen=True)
class PromptCosts:
    """Token counts of the parts of a prompt that are not context words (see `fit_model.py`)."""

    base: int
    """Tokens of the prompt with no context present (instruction, question and their separator)."""
    separator: int
    """Tokens one more present context adds besides its own (the separator)."""
    space: int
    """Tokens of " " alone (a deletion's replacement within a line)."""
    newline: int
    """Tokens of "\\n" alone (a deletion's replacement across lines)."""


def link_tokens(a: DocAnalysis, x: int, y: int, space: int, newline: int) -> int:
    """Tokens between kept words x < y with none kept between them: the gap before y as
    `words.join_words` writes it (the original gap, or a deletion's one-character replacement)."""
    assert a.gap_tokens is not None
    if y == x + 1:
        return a.gap_tokens[y]
    if a.gap_newlines[y + 1] - a.gap_newlines[x + 1]:
        repl, cost = "\n", newline
    elif a.gap_spaces[y + 1] - a.gap_spaces[x + 1]:
        repl, cost = " ", space
    else:
        return 0
    return a.gap_tokens[y] if a.gap_text(y) == repl else cost


def joined_tokens(a: DocAnalysis, kept: list[int], space: int, newline: int) -> int:
    """Tokens of `join_words(text, words, kept)` as priced from the analysis (`kept` ascending)."""
    assert a.word_tokens is not None
    total = 0
    prev = -1
    for w in kept:
        total += a.word_tokens[w]
        if prev >= 0:
            total += link_tokens(a, prev, w, space, newline)
        prev = w
    return total


class AnalysisCache:
    """Analyses by text, least recently used dropped past `max_entries`. Thread-safe."""

    def __init__(self, tokenizer: TargetTokenizer, max_entries: int = 4096) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._entries: OrderedDict[str, DocAnalysis] = OrderedDict()
        self._counted: OrderedDict[str, TokenSpans | int] = OrderedDict()  # counted, not yet analysed
        self._lock = threading.Lock()

    def count(self, text: str) -> int:
        """Tokens of `text`, from its analysis or from one tokenization kept for analysing it later."""
        with self._lock:
            hit = self._entries.get(text)
            if hit is not None:
                return hit.num_tokens
            known = self._counted.get(text)
        if known is None:
            spans = self.tokenizer.spans(text)
            known = spans if spans is not None else self.tokenizer.count(text)
            with self._lock:
                self._counted[text] = known
                while len(self._counted) > self.max_entries:
                    self._counted.popitem(last=False)
        return known if isinstance(known, int) else len(known)

    def get(self, text: str) -> DocAnalysis:
        """The analysis of `text`, built on first use (reusing a tokenization `count` made)."""
        with self._lock:
            hit = self._entries.get(text)
            if hit is not None:
                self._entries.move_to_end(text)
                return hit
            counted = self._counted.pop(text, None)
        analysis = analyze(text, self.tokenizer, counted if isinstance(counted, list) else None)
        with self._lock:
            self._entries[text] = analysis
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return analysis

    def clear(self) -> None:
        """Forget every cached text."""
        with self._lock:
            self._entries.clear()
            self._counted.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict[str, Any]:  # pickled into worker processes without its entries
        return {"tokenizer": self.tokenizer, "max_entries": self.max_entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tokenizer"], state["max_entries"])  # type: ignore[misc]

