"""Documents in JSON text (tool output): which string fields hold them, and how to remove array elements.

The scanner walks the JSON text itself, not a parsed copy, so every position is exact: a document is
the characters inside one string's quotes, and an array element is its exact span. A layout built on
this rewrites only those characters; numbers, key order, spacing and escapes elsewhere stay as written.

Documents: string fields named text / content / body / snippet / ... (at least 20 characters), and
long strings directly in arrays. Each is labelled with its object's id / title / name when it has one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import NamedTuple

from terse.compress.words import Span

_WS = re.compile(r"\s*")
_JSON_TEXT_KEYS = frozenset(
    ("text", "content", "body", "snippet", "passage", "page_content", "chunk", "document", "abstract",
     "summary", "description", "excerpt", "article", "contents", "full_text")
)
_JSON_LABEL_KEYS = ("id", "title", "name", "url", "source", "doc_id")
_JSON_MIN_CHARS = 20
_JSON_MAX_DEPTH = 64


class _Scanner:
    """Walks a JSON text recording the string fields that hold documents and every array's element spans."""

    def __init__(self, text: str, min_passage_chars: int) -> None:
        self.text = text
        self.min_passage_chars = min_passage_chars
        self.documents: list[tuple[str, Span, str]] = []
        self.elements: list[tuple[int, int]] = []
        self.arrays: list[list[Span]] = []
        self._decoder = json.JSONDecoder()

    def value(self, i: int, depth: int, key: str | None, element: tuple[int, int]) -> int:
        if depth > _JSON_MAX_DEPTH:
            raise ValueError("JSON nested too deep to look for documents")
        c = self.text[i]
        if c == "{":
            return self.object(i, depth, element)
        if c == "[":
            return self.array(i, depth)
        if c == '"':
            decoded, end = self._decoder.raw_decode(self.text, i)
            is_text_field = key is not None and key.lower() in _JSON_TEXT_KEYS and len(decoded) >= _JSON_MIN_CHARS
            is_passage = key is None and element[0] >= 0 and len(decoded) >= self.min_passage_chars
            if is_text_field or is_passage:
                self.documents.append((decoded, Span(i + 1, end - 1), ""))
                self.elements.append(element)
            return int(end)
        _, end = self._decoder.raw_decode(self.text, i)
        return int(end)

    def object(self, i: int, depth: int, element: tuple[int, int]) -> int:
        first_doc = len(self.documents)
        labels: dict[str, str] = {}
        i = self._ws(i + 1)
        if self.text[i] == "}":
            return i + 1
        while True:
            key, i = self._decoder.raw_decode(self.text, i)
            i = self._ws(self._expect(self._ws(i), ":"))
            if key in _JSON_LABEL_KEYS and self.text[i] in '"0123456789':
                labels.setdefault(key, str(self._decoder.raw_decode(self.text, i)[0]))
            i = self._ws(self.value(i, depth + 1, key, element))
            if self.text[i] == ",":
                i = self._ws(i + 1)
                continue
            end = self._expect(i, "}")
            label = next((labels[k] for k in _JSON_LABEL_KEYS if k in labels), "")
            for n in range(first_doc, len(self.documents)):
                if not self.documents[n][2]:
                    self.documents[n] = (*self.documents[n][:2], label)
            return end

    def array(self, i: int, depth: int) -> int:
        array_id = len(self.arrays)
        self.arrays.append([])
        i = self._ws(i + 1)
        if self.text[i] == "]":
            return i + 1
        while True:
            end = self.value(i, depth + 1, None, (array_id, len(self.arrays[array_id])))
            self.arrays[array_id].append(Span(i, end))
            i = self._ws(end)
            if self.text[i] == ",":
                i = self._ws(i + 1)
                continue
            return self._expect(i, "]")

    def _ws(self, i: int) -> int:
        return _WS.match(self.text, i).end()  # type: ignore[union-attr]

    def _expect(self, i: int, char: str) -> int:
        if self.text[i] != char:
            raise ValueError(f"expected {char!r} at {i}")
        return i + 1

class JsonScan(NamedTuple):
    """What `scan_json` found."""

    documents: tuple[tuple[str, Span, str], ...]
    """(decoded text, span inside the quotes, label) per document, in text order."""
    elements: tuple[tuple[int, int], ...]
    """Per document, (array id, element index) of the array element holding it, or (-1, -1)."""
    arrays: tuple[tuple[Span, ...], ...]
    """Per array id, the spans of its elements."""


def scan_json(text: str, min_passage_chars: int) -> JsonScan | None:
    """The documents of a JSON text, or None when it is not JSON (or nested too deep to walk)."""
    try:
        json.loads(text)
        scanner = _Scanner(text, min_passage_chars)
        scanner.value(_WS.match(text).end(), 0, None, (-1, -1))  # type: ignore[union-attr]
    except (ValueError, RecursionError, IndexError):
        return None
    return JsonScan(tuple(scanner.documents), tuple(scanner.elements), tuple(tuple(a) for a in scanner.arrays))


def array_cuts(elements: Sequence[Span], removed: set[int]) -> list[Span]:
    """Spans to delete so the array loses `removed` elements and stays valid JSON.

    A run of removed elements followed by a kept one goes with its trailing separators; a run at the
    end goes with the separator before it. All removed: the elements go, the brackets stay ("[ ]").
    """
    kept = [i for i in range(len(elements)) if i not in removed]
    if not kept:
        return [Span(elements[0].start, elements[-1].end)]
    cuts: list[Span] = []
    run: list[int] = []
    for i in range(len(elements) + 1):
        if i < len(elements) and i in removed:
            run.append(i)
            continue
        if run:
            if i < len(elements):
                cuts.append(Span(elements[run[0]].start, elements[i].start))
            else:
                cuts.append(Span(elements[kept[-1]].end, elements[run[-1]].end))
            run = []
    return cuts


def json_string_body(new: str, raw: str) -> str:
    """`new` escaped as the inside of a JSON string, ASCII-only when the original was written so."""
    ascii_only = "\\u" in raw and raw.isascii()
    return json.dumps(new, ensure_ascii=ascii_only)[1:-1]
