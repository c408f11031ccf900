"""Protected spans: character intervals of a text that compression must keep whole.

Each kind of span is found by one small detector (a function `text -> list[Span]`) in `DETECTORS`,
keyed by the `ProtectionPolicy` flag that switches it on. A word overlapping any protected interval
is protected; all words of a multi-word span are protected together, so the span stays contiguous
and keeps its inner whitespace (see `words.join_words`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from terse.compress.config import ProtectionPolicy
from terse.compress.words import Span

Detector = Callable[[str], list[Span]]

_NUMBER_RE = re.compile(r"[-+]?[$€£¥]?\d[\d,._:/%-]*[年月日号號時时分秒万萬亿億]?")
_CJK_NUMBER_RE = re.compile(r"[〇零一二三四五六七八九十百千万萬亿億兆两兩][〇零一二三四五六七八九十百千万萬亿億兆两兩点點]*"
                            r"[〇零一二三四五六七八九十百千万萬亿億兆两兩][年月日号號時时分秒%％]?|[０-９][０-９.．]*")
_MONTHS = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|"
           r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DATE_RE = re.compile(rf"\b(?:{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?|\d{{1,2}}(?:st|nd|rd|th)?\s+"
                      rf"(?:of\s+)?{_MONTHS}(?:,?\s+\d{{4}})?|{_MONTHS}\s+\d{{4}})\b")
_URL_RE = re.compile(r"\b(?:[a-z][a-z0-9+.-]*://|www\.)[^\s<>\"'`]+[^\s<>\"'`.,;:!?)\]}»”’]", re.IGNORECASE)
_EMAIL_RE = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[a-z]{2,}\b", re.IGNORECASE)
_FENCED_RE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_INLINE_CODE_RE = re.compile(r"`[^`\n]+`")
_JSON_KEY_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"\s*:')
_ROLE_RE = re.compile(
    r"^[ \t]*(?:system|user|assistant|tool|human|ai|question|answer|q|a)[ \t]*:", re.IGNORECASE | re.MULTILINE
)
_MD_HEADING_RE = re.compile(r"^[ \t]*#{1,6}[ \t].*$", re.MULTILINE)
_MD_MARKER_RE = re.compile(r"^[ \t]*(?:[-*+]|\d+[.)]|>|---+|\*\*\*+)(?=[ \t]|$)", re.MULTILINE)
_MD_PIPE_RE = re.compile(r"\|")


def _regex_detector(*patterns: re.Pattern[str]) -> Detector:
    def detect(text: str) -> list[Span]:
        return [Span(m.start(), m.end()) for p in patterns for m in p.finditer(text) if m.end() > m.start()]

    return detect


DETECTORS: dict[str, Detector] = {
    "numbers": _regex_detector(_NUMBER_RE, _CJK_NUMBER_RE),
    "dates": _regex_detector(_DATE_RE),
    "urls": _regex_detector(_URL_RE),
    "emails": _regex_detector(_EMAIL_RE),
    "code_blocks": _regex_detector(_FENCED_RE, _INLINE_CODE_RE),
    "json_keys": _regex_detector(_JSON_KEY_RE),
    "role_labels": _regex_detector(_ROLE_RE),
    "markdown": _regex_detector(_MD_HEADING_RE, _MD_MARKER_RE, _MD_PIPE_RE),
}


def user_spans(text: str, policy: ProtectionPolicy) -> list[Span]:
    """Spans of the user's literals and patterns (kept wherever they occur)."""
    spans: list[Span] = []
    for literal in policy.literals:
        start = text.find(literal)
        while start >= 0:
            spans.append(Span(start, start + len(literal)))
            start = text.find(literal, start + 1)
    for pattern in policy.patterns:
        spans.extend(Span(m.start(), m.end()) for m in re.finditer(pattern, text) if m.end() > m.start())
    return spans


def structural_spans(text: str, policy: ProtectionPolicy) -> list[Span]:
    """Spans found by the structural detectors the policy switches on."""
    spans: list[Span] = []
    for flag, detect in DETECTORS.items():
        if getattr(policy, flag):
            spans.extend(detect(text))
    return spans


def protected_words(words: Sequence[Span], spans: Sequence[Span]) -> list[bool]:
    """For each word, whether it overlaps any of `spans` (both sorted or not; O((W + S) log S))."""
    return [g >= 0 for g in protected_groups(words, spans)]


def protected_groups(words: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """For each word, the index of the merged protected span it overlaps, or -1. Words sharing an
    index are kept or cut together (a span is never kept in part)."""
    if not spans:
        return [-1] * len(words)
    merged = _merge(spans)
    groups: list[int] = []
    j = 0
    for start, end in words:
        while j < len(merged) and merged[j].end <= start:
            j += 1
        groups.append(j if j < len(merged) and merged[j].start < end else -1)
    return groups


def _merge(spans: Sequence[Span]) -> list[Span]:
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1].end:
            if end > merged[-1].end:
                merged[-1] = Span(merged[-1].start, end)
        else:
            merged.append(Span(start, end))
    return merged
