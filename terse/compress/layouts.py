"""Where the documents sit in one chat message: the layouts apps send, found by pure rules.

A message's text splits into documents (each one context for question-aware compression) and
everything else (instructions, the question, labels, tags, JSON structure), which stays byte for byte.
`parse_layout` tries the recognisers in order and takes the first that finds documents:

    json       the whole text is JSON: string fields named text / content / snippet / ... and long
               strings in arrays (tool output); everything else, numbers included, stays as written
    tags       <document ...>...</document> elements (a <document_content> / <content> child when
               there is one), else the bodies of <documents> / <context> / <search_results> / ...
    sections   a "Context:" / "Documents:" / "Sources:" section, up to "Question:" or the end
    numbered   sources marked at line starts: [1], [doc-7], Source 2:, Document 3.
    headings   markdown headings whose bodies are long and read as material, not instructions
    passages   blank-line-separated paragraphs that are long and read as material
    whole      (only where the caller allows it: earlier turns, tool results) the whole text
    none       nothing recognised confidently: the text stays verbatim

Inside a container (a section body, a <context> element) documents are split by the same tag /
numbered / heading / blank-line rules; a container that does not split is one document.

    Answer using the documents.      verbatim (instruction)
    <documents>                      verbatim
    <document id="1">               ─┐ unit of document 0, removed whole when the compression
    text one ...                     │ drops the document; "text one ..." alone is the
    </document>                     ─┘ document (what is compressed)
    </documents>
    Question: Who founded Acme?      verbatim (question)

Material that reads as instructions (second person, "answer", "must", "do not", ...) is never taken
as a passage or a heading body: a false "instruction" costs some saving, a false "document" could
cut an instruction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from terse.compress.json_scan import array_cuts, json_string_body, scan_json
from terse.compress.words import Span

LayoutKind = Literal["json", "tags", "sections", "numbered", "headings", "passages", "whole", "none"]

MIN_PASSAGE_CHARS = 200
"""Default shortest paragraph (or heading body) taken as a document outside a container (~40 words)."""

_WS = re.compile(r"\s*")
_SPACES = re.compile(r"[ \t]*")
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
_DOC_TAGS = "document|doc|passage|source|result|search_result|snippet|chunk|article|excerpt|page|file"
_CONTAINER_TAGS = (
    "documents|docs|context|contexts|sources|passages|search_results|results|retrieved_documents|"
    "knowledge|references|reference|materials|background"
)
_DOC_ELEMENT = re.compile(rf"<({_DOC_TAGS})(?=[\s>/])[^<>]*>(.*?)</\1\s*>", re.I | re.S)
_CONTAINER_ELEMENT = re.compile(rf"<({_CONTAINER_TAGS})(?=[\s>/])[^<>]*>(.*?)</\1\s*>", re.I | re.S)
_CONTENT_CHILD = re.compile(
    r"<(document_content|content|text|body|page_content|snippet_text)(?=[\s>/])[^<>]*>(.*?)</\1\s*>", re.I | re.S
)
_ANY_TAG = re.compile(r"</?[A-Za-z][\w.:-]*(?:\s[^<>]*)?/?>")
_LAST_CLOSE = re.compile(r".*</[A-Za-z][\w.:-]*\s*>", re.S)

_LABEL = (
    r"^[ \t]*(?P<hash>#{{1,6}}[ \t]+)?(?:\*\*)?(?:{names})(?:\*\*)?[ \t]*"
    r"(?:(?P<colon>:)(?:\*\*)?[ \t]*(?P<rest>[^\n]*)|$)"
)
_DOC_NAMES = (
    r"context|contexts|documents?|sources|passages|search results|retrieved (?:documents|passages|context)|"
    r"references?|reference (?:material|documents|text)|knowledge(?: base)?|background(?: information)?"
)
_END_NAMES = r"question|questions|query|user question|instructions?|task|answer|q"
_DOC_LABEL = re.compile(_LABEL.format(names=_DOC_NAMES), re.I | re.M)
_END_LABEL = re.compile(_LABEL.format(names=_END_NAMES), re.I | re.M)

# markers that open a source at a line start: strong ones anywhere, weak ones ("1.", "(2)") only in a
# container, where a numbered list is a list of sources rather than of instructions
_STRONG_MARKER = re.compile(
    r"^[ \t]*(?:\[[^\]\n]{1,40}\](?![(:\[])|(?:source|document|doc|passage|result|reference|excerpt|snippet)"
    r"[ \t]*#?[ \t]*\d{1,4}[ \t]*[:.)\]\-–—])[ \t]*",
    re.I | re.M,
)
_WEAK_MARKER = re.compile(r"^[ \t]*(?:\(\d{1,3}\)|\d{1,3}[.)])[ \t]+", re.M)
_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]+(?P<title>[^\n]*?)[ \t#]*$", re.M)
_INSTRUCTION_HEADING = re.compile(
    r"^(?:instructions?|rules?|role|persona|guidelines?|task|output(?: format)?|format|style|tone|"
    r"examples?|tools?|constraints?|system|question|query|answer|notes?)\b",
    re.I,
)
_INSTRUCTION_CUES = re.compile(
    r"\b(?:you|your|you're|yourself|answer|respond|reply|cite|must|should|do not|don't|never|always|please|"
    r"assistant|instructions?)\b",
    re.I,
)
@dataclass(frozen=True)
class DocumentSpan:
    """One document found in a message."""

    text: str
    """What is compressed: the document's text (a JSON string field decoded)."""
    span: Span
    """Where it is in the message text (for JSON: the string field's characters inside the quotes)."""
    label: str = ""
    """Its marker, id or title where the layout gives one ("[3]", "doc-7"), else ""."""


@dataclass(frozen=True)
class TextLayout:
    """Documents of a plain-text message, each inside a removable unit."""

    text: str
    kind: LayoutKind
    documents: tuple[DocumentSpan, ...] = ()
    units: tuple[Span, ...] = ()
    """Per document, the stretch removed when it is dropped: the document with its marker, heading line
    or element tags (units never overlap)."""

    def render(self, texts: Sequence[str]) -> str:
        """The text with document i replaced by `texts[i]` ("" removes the document's unit).

        A removed unit takes the whitespace after it along when the text before it already ends in
        whitespace, so removing documents leaves one separator where there were several.
        """
        _check_count(texts, self.documents)
        pieces: list[str] = []
        pos = 0
        for doc, unit, new in zip(self.documents, self.units, texts):
            if new:
                pieces += [self.text[pos : doc.span.start], new]
                pos = doc.span.end
                continue
            pieces.append(self.text[pos : unit.start])
            pos = unit.end
            before = next((p for p in reversed(pieces) if p), "\n")
            if before[-1].isspace():
                gap = _WS if before[-1] == "\n" else _SPACES
                pos = gap.match(self.text, pos).end()  # type: ignore[union-attr]
        pieces.append(self.text[pos:])
        return "".join(pieces)

    def verbatim_text(self) -> str:
        """The text outside every document's unit: instructions, question, labels."""
        return self.render([""] * len(self.documents))


@dataclass(frozen=True)
class JsonLayout:
    """Documents in string fields of a JSON text; rendering keeps every other byte as written."""

    text: str
    documents: tuple[DocumentSpan, ...]
    elements: tuple[tuple[int, int], ...]
    """Per document, (array id, element index) of the array element holding it, or (-1, -1)."""
    arrays: tuple[tuple[Span, ...], ...]
    """Per array id, the spans of its elements."""
    kind: LayoutKind = "json"

    def render(self, texts: Sequence[str]) -> str:
        """The JSON text with document i's string replaced by `texts[i]`; an array element whose
        documents are all "" is removed with its separator, so the result is valid JSON."""
        _check_count(texts, self.documents)
        # an element goes when every document in it is dropped; a lone dropped field becomes ""
        alive: dict[tuple[int, int], bool] = {}
        for element, new in zip(self.elements, texts):
            alive[element] = alive.get(element, False) or bool(new)
        removed: dict[int, set[int]] = {}
        for (array, index), keep in alive.items():
            if array >= 0 and not keep:
                removed.setdefault(array, set()).add(index)
        cuts = [cut for array, indices in removed.items() for cut in array_cuts(self.arrays[array], indices)]
        cuts = [c for c in cuts if not any(o != c and o.start <= c.start and c.end <= o.end for o in cuts)]
        edits = [(c.start, c.end, "") for c in cuts]
        for doc, new in zip(self.documents, texts):
            if not any(c.start <= doc.span.start and doc.span.end <= c.end for c in cuts):
                raw = self.text[doc.span.start : doc.span.end]
                edits.append((doc.span.start, doc.span.end, json_string_body(new, raw)))
        pieces: list[str] = []
        pos = 0
        for start, end, new_text in sorted(edits):
            pieces += [self.text[pos:start], new_text]
            pos = end
        pieces.append(self.text[pos:])
        return "".join(pieces)

    def verbatim_text(self) -> str:
        """Tool output holds no question or instruction: nothing conditions the compression."""
        return ""


Layout = TextLayout | JsonLayout
"""A message's text with its documents located. `render(texts)` replaces document i with `texts[i]`,
touching nothing else, except that "" removes the document with its unit (markers, tags, a JSON array
element and its separator); `verbatim_text()` is the text outside every unit (instructions, question)."""


def parse_layout(text: str, *, whole_fallback: bool = False, min_passage_chars: int = MIN_PASSAGE_CHARS) -> Layout:
    """The layout of one message text (see the module docstring for the recognisers and their order).

    `whole_fallback`: when nothing is recognised, take the whole text as one document (for turns that
    are material by nature: tool results, earlier turns) instead of leaving it verbatim.
    """
    if text.lstrip()[:1] in ("[", "{"):
        scan = scan_json(text, min_passage_chars)
        if scan is not None and scan.documents:
            documents = tuple(DocumentSpan(t, span, label) for t, span, label in scan.documents)
            return JsonLayout(text, documents, scan.elements, scan.arrays)
    for kind, finder in _RECOGNISERS:
        hits = finder(text, min_passage_chars)
        if hits:
            return _text_layout(text, kind, hits)
    if whole_fallback and text.strip():
        return _text_layout(text, "whole", [_Hit(_strip(text, 0, len(text)), 0)])
    return TextLayout(text, "none")


# -- plain text --------------------------------------------------------------------------------------------
class _Hit(NamedTuple):
    span: Span
    """The document's characters."""
    unit_start: int
    """Where its unit starts (its marker, opening tag or heading line)."""
    label: str = ""
    unit_end: int = -1
    """Where its unit ends when past the document (an element's closing tag); -1: the document's end."""


class _Finder(Protocol):
    """A top-level recogniser: the documents it finds in a whole message text ([] when it finds none)."""

    def __call__(self, text: str, min_chars: int) -> list[_Hit]: ...


def _text_layout(text: str, kind: LayoutKind, hits: Sequence[_Hit]) -> TextLayout:
    hits = sorted(h for h in hits if h.span.end > h.span.start)
    units = tuple(Span(h.unit_start, max(h.unit_end, h.span.end)) for h in hits)
    documents = tuple(DocumentSpan(text[h.span.start : h.span.end], h.span, h.label) for h in hits)
    return TextLayout(text, kind, documents, units)


def _strip(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return Span(start, end)


def _tags(text: str, min_chars: int) -> list[_Hit]:
    hits = _tag_documents(text, 0, len(text))
    if hits:
        return hits
    for element in _CONTAINER_ELEMENT.finditer(text):
        hits += _split_container(text, element.start(2), element.end(2))
    return hits


def _tag_documents(text: str, lo: int, hi: int) -> list[_Hit]:
    """Documents of the <document>-like elements in text[lo:hi] (nested ones recursed into)."""
    hits: list[_Hit] = []
    for element in _DOC_ELEMENT.finditer(text, lo, hi):
        body_start, body_end = element.start(2), element.end(2)
        content = _CONTENT_CHILD.search(text, body_start, body_end)
        inner = _tag_documents(text, body_start, body_end) if content is None else []
        if content is not None:
            span = _strip(text, content.start(2), content.end(2))
            hits.append(_Hit(span, element.start(), _opening(element), element.end()))
        elif inner:
            hits += inner
        else:
            # metadata children first (<title>, <source>): the document is what follows the last of them
            last_close = _LAST_CLOSE.match(text, body_start, body_end)
            start = last_close.end() if last_close is not None else body_start
            span = _strip(text, start, body_end)
            if not _ANY_TAG.search(text, span.start, span.end):
                hits.append(_Hit(span, element.start(), _opening(element), element.end()))
    return hits


def _opening(element: re.Match[str]) -> str:
    return element.group(0)[: element.group(0).find(">") + 1]


def _sections(text: str, min_chars: int) -> list[_Hit]:
    hits: list[_Hit] = []
    labels = [m for m in _DOC_LABEL.finditer(text) if m.group("colon") or m.group("hash")]
    ends = [m.start() for m in _END_LABEL.finditer(text) if m.group("colon") or m.group("hash")]
    for i, label in enumerate(labels):
        start = label.start("rest") if label.group("rest") else label.end()
        stop = min([e for e in ends if e > label.start()] + [len(text)])
        if i + 1 < len(labels):
            stop = min(stop, labels[i + 1].start())
        found = _split_container(text, start, stop)
        # "Context: you are the support assistant of ..." is an instruction, not a document
        if len(found) == 1 and _reads_as_instruction(text[found[0].span.start : found[0].span.end]):
            continue
        hits += found
    return hits


def _split_container(text: str, lo: int, hi: int) -> list[_Hit]:
    """Documents of a region known to hold documents; it is one document if it does not split."""
    for finder in (_tag_documents, _marker_hits_strong, _marker_hits_weak, _heading_hits_in):
        hits = finder(text, lo, hi)
        if hits:
            return hits
    paragraphs = _paragraphs(text, lo, hi)
    return [_Hit(p, p.start) for p in paragraphs]


def _marker_hits_strong(text: str, lo: int, hi: int) -> list[_Hit]:
    return _marker_hits(text, lo, hi, _STRONG_MARKER)


def _marker_hits_weak(text: str, lo: int, hi: int) -> list[_Hit]:
    return _marker_hits(text, lo, hi, _WEAK_MARKER)


def _marker_hits(text: str, lo: int, hi: int, marker: re.Pattern[str]) -> list[_Hit]:
    markers = [m for m in marker.finditer(text, lo, hi) if _at_line_start(text, m.start(), lo)]
    hits: list[_Hit] = []
    for i, m in enumerate(markers):
        stop = markers[i + 1].start() if i + 1 < len(markers) else hi
        hits.append(_Hit(_strip(text, m.end(), stop), m.start(), m.group(0).strip()))
    return hits


def _at_line_start(text: str, pos: int, lo: int) -> bool:
    return pos == lo or text[pos - 1] == "\n" or pos == 0


def _heading_hits_in(text: str, lo: int, hi: int) -> list[_Hit]:
    return _heading_hits(text, lo, hi, min_chars=1)


def _heading_hits(text: str, lo: int, hi: int, min_chars: int) -> list[_Hit]:
    headings = list(_HEADING.finditer(text, lo, hi))
    hits: list[_Hit] = []
    for i, h in enumerate(headings):
        stop = headings[i + 1].start() if i + 1 < len(headings) else hi
        span = _strip(text, h.end(), stop)
        title = h.group("title")
        if _INSTRUCTION_HEADING.match(title) or span.end - span.start < min_chars:
            continue
        if min_chars > 1 and _reads_as_instruction(text[span.start : span.end]):
            continue
        hits.append(_Hit(span, h.start(), title))
    return hits


def _paragraphs(text: str, lo: int, hi: int) -> list[Span]:
    spans: list[Span] = []
    start = lo
    for gap in _BLANK_LINE.finditer(text, lo, hi):
        spans.append(_strip(text, start, gap.start()))
        start = gap.end()
    spans.append(_strip(text, start, hi))
    return [s for s in spans if s.end > s.start]


def _reads_as_instruction(paragraph: str) -> bool:
    return _INSTRUCTION_CUES.search(paragraph[:240]) is not None


def _numbered(text: str, min_chars: int) -> list[_Hit]:
    hits = [h for h in _marker_hits_strong(text, 0, len(text)) if h.span.end > h.span.start]
    if not hits:
        return []
    # the last source ends where a short or instruction-like paragraph starts (the question, a request)
    last = hits[-1]
    hits[-1] = last._replace(span=_material_prefix(text, last.span, min_chars))
    return hits if any(h.span.end - h.span.start >= min_chars for h in hits) else []


def _material_prefix(text: str, span: Span, min_chars: int) -> Span:
    paragraphs = _paragraphs(text, span.start, span.end)
    end = paragraphs[0].end
    for p in paragraphs[1:]:
        body = text[p.start : p.end]
        if len(body) < min_chars or _reads_as_instruction(body) or _is_end_label(body):
            break
        end = p.end
    return Span(span.start, end)


def _is_end_label(paragraph: str) -> bool:
    label = _END_LABEL.match(paragraph)
    return label is not None and bool(label.group("colon") or label.group("hash"))


def _headings(text: str, min_chars: int) -> list[_Hit]:
    hits = _heading_hits(text, 0, len(text), min_chars)
    if hits and hits[-1].span.end == _strip(text, 0, len(text)).end:
        hits[-1] = hits[-1]._replace(span=_material_prefix(text, hits[-1].span, min_chars))
    return hits


def _passages(text: str, min_chars: int) -> list[_Hit]:
    paragraphs = _paragraphs(text, 0, len(text))
    material = [
        p for p in paragraphs if p.end - p.start >= min_chars and not _reads_as_instruction(text[p.start : p.end])
    ]
    # one long paragraph alone is not a layout: it may be the instruction or the question itself
    if not material or (len(material) == 1 and len(paragraphs) == 1):
        return []
    return [_Hit(p, p.start) for p in material]


_RECOGNISERS: tuple[tuple[LayoutKind, _Finder], ...] = (
    ("tags", _tags),
    ("sections", _sections),
    ("numbered", _numbered),
    ("headings", _headings),
    ("passages", _passages),
)


def _check_count(texts: Sequence[str], documents: Sequence[DocumentSpan]) -> None:
    if len(texts) != len(documents):
        raise ValueError(f"render() got {len(texts)} texts for {len(documents)} documents")
