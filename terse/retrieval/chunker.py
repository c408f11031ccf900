"""Sentence-aware chunking to a token budget, with overlap and exact character offsets.

    text     |The cat sat. It was warm.  A dog barked loudly at it. ...|
    sentences [----s0----] [---s1---]  [----------s2----------]  ...
    chunks   [====== chunk 0: s0 s1 s2 (<= chunk_tokens) ======]
                           [== chunk 1: s1 s2 (overlap) s3 ... ==]

Sentences are packed greedily up to `chunk_tokens`; the next chunk starts with the trailing sentences of
the previous one that fit in `overlap_tokens` (always a strict suffix, so every chunk adds something).
A sentence longer than the budget becomes windows of `chunk_tokens` tokens cut at token boundaries,
stepping `chunk_tokens - overlap_tokens`. Lengths are counted in the embedder's own tokenizer, from one
tokenization of the whole document; a chunk's span runs from its first sentence's first character to
its last sentence's last character, so `doc.text[chunk.char_start:chunk.char_end] == chunk.text`.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Protocol

from terse.retrieval.config import ChunkerConfig
from terse.retrieval.types import Chunk, Document

# A cut goes right after each match: latin sentence ends (with closing quotes/brackets) before
# whitespace, CJK sentence ends (no space follows them), blank lines, and newlines that open a
# markdown block (heading, list item, quote, table row), since those are units even without a period.
_BOUNDARY = re.compile(
    r"""[.!?\u2026]+["'\u201d\u2019)\]]*(?=\s)
      | [\u3002\uff01\uff1f]+[\u300d\u300f\u201d\u2019)]*
      | \n[ \t]*\n
      | \n(?=[ \t]*(?:\#|[-*+][ \t]|\d+[.)][ \t]|>|\|))""",
    re.VERBOSE,
)
_REGEX_TOKEN = re.compile(r"\w+|[^\w\s]")


class TokenOffsets(Protocol):
    """Anything that can tokenize text into character spans (one per token, no special tokens)."""

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """[(start, end)] of every token of `text`, in order; `text[start:end]` is the token's source."""
        ...


class RegexTokenizer:
    """Words and single punctuation marks: a model-free stand-in for counting tokens."""

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _REGEX_TOKEN.finditer(text)]


@dataclass(frozen=True)
class _Sentence:
    char_start: int
    char_end: int
    token_start: int  # index into the document's token list
    token_end: int

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of `text`, stripped of surrounding whitespace, in order."""
    cuts = [0, *(m.end() for m in _BOUNDARY.finditer(text)), len(text)]
    spans: list[tuple[int, int]] = []
    for start, end in zip(cuts, cuts[1:]):
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + lead + len(stripped)))
    return spans


class Chunker:
    """Cuts documents into `Chunk`s of at most `config.chunk_tokens` tokens of `tokenizer`."""

    def __init__(self, config: ChunkerConfig, tokenizer: TokenOffsets) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def chunk(self, document: Document) -> list[Chunk]:
        """The chunks of one document, in order; an empty or whitespace-only text gives none."""
        text = document.text
        offsets = self.tokenizer.token_offsets(text)
        token_starts = [start for start, _ in offsets]
        sentences = [
            _Sentence(s, e, bisect.bisect_left(token_starts, s), bisect.bisect_left(token_starts, e))
            for s, e in split_sentences(text)
        ]
        spans = self._pack(sentences, offsets)
        return [
            Chunk(document.id, index, start, end, text[start:end], num_tokens)
            for index, (start, end, num_tokens) in enumerate(spans)
        ]

    def _pack(
        self, sentences: list[_Sentence], offsets: list[tuple[int, int]]
    ) -> list[tuple[int, int, int]]:
        """Greedy sentence packing -> [(char_start, char_end, num_tokens)]."""
        budget = self.config.chunk_tokens
        spans: list[tuple[int, int, int]] = []
        current: list[_Sentence] = []
        for sentence in sentences:
            if sentence.num_tokens > budget:
                self._flush(current, spans)
                current = []
                spans.extend(self._windows(sentence, offsets))
                continue
            num_current = sum(s.num_tokens for s in current)
            if current and num_current + sentence.num_tokens > budget:
                self._flush(current, spans)
                current = self._overlap_tail(current, sentence.num_tokens)
            current.append(sentence)
        self._flush(current, spans)
        return spans

    def _overlap_tail(self, sentences: list[_Sentence], num_next: int) -> list[_Sentence]:
        """The longest strict suffix within overlap_tokens that still leaves room for the next sentence."""
        tail: list[_Sentence] = []
        num_tail = 0
        for sentence in reversed(sentences[1:]):
            num_tail += sentence.num_tokens
            if num_tail > self.config.overlap_tokens or num_tail + num_next > self.config.chunk_tokens:
                break
            tail.insert(0, sentence)
        return tail

    @staticmethod
    def _flush(sentences: list[_Sentence], spans: list[tuple[int, int, int]]) -> None:
        if sentences:
            num_tokens = sum(s.num_tokens for s in sentences)
            spans.append((sentences[0].char_start, sentences[-1].char_end, num_tokens))

    def _windows(self, sentence: _Sentence, offsets: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """Token windows over one over-long sentence, cut at token boundaries."""
        budget, stride = self.config.chunk_tokens, self.config.chunk_tokens - self.config.overlap_tokens
        windows: list[tuple[int, int, int]] = []
        start = sentence.token_start
        while True:
            end = min(start + budget, sentence.token_end)
            windows.append((offsets[start][0], offsets[end - 1][1], end - start))
            if end == sentence.token_end:
                return windows
            start += stride
