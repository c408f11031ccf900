"""Words inside runs of CJK text, which put no spaces between words.

A CJK run (Han, kana, CJK punctuation, full-width forms) is cut into words by a maintained
segmenter, never into single characters, so a deletion never breaks a word (北京 stays 北京):

    numerals first     一九五八年, 一千五百万, ３２ -> one word each (with a date or amount suffix)
    Chinese            jieba (the `rjieba` binding of jieba-rs), when installed
    Japanese (kana)    janome's morphological analyser, when installed
    otherwise          character-class runs (Han / hiragana / katakana / other), at most 4 characters

`SEGMENTERS` maps a script ("chinese", "japanese") to its segmenter factory; a factory returns None
when its package is not installed, and the character-class fallback takes over. Install the `cjk`
extra (`pip install terse[cjk]`) for dictionary segmentation.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

Segmenter = Callable[[str], list[tuple[int, int]]]
"""Text of one CJK run -> word spans covering it, in order, without gaps."""

_NUMERAL = "〇零一二三四五六七八九十百千万萬亿億兆两兩"
_DIGIT = "0-9０-９"
# a numeral of >= 2 numeral characters, or digits, with an optional date / amount suffix
NUMERAL_RE = re.compile(
    rf"(?:[{_DIGIT}]+(?:[.．][{_DIGIT}]+)?|[{_NUMERAL}][{_NUMERAL}点點]*[{_NUMERAL}])"
    rf"[年月日号號時时分秒%％万萬亿億]?"
)
_KANA_RE = re.compile(r"[\u3040-\u30ff]")
_HAN, _HIRAGANA, _KATAKANA = "han", "hiragana", "katakana"
_MAX_FALLBACK_CHARS = 4

_lock = threading.Lock()
_loaded: dict[str, Segmenter | None] = {}


def _jieba() -> Segmenter | None:
    try:
        import rjieba
    except ImportError:
        return None

    def segment(text: str) -> list[tuple[int, int]]:
        return [(start, end) for _, start, end in rjieba.tokenize(text)]

    return segment


def _janome() -> Segmenter | None:
    try:
        from janome.tokenizer import Tokenizer
    except ImportError:
        return None
    tokenizer = Tokenizer(wakati=True)
    guard = threading.Lock()  # janome's tokenizer keeps per-call state

    def segment(text: str) -> list[tuple[int, int]]:
        with guard:
            pieces = list(tokenizer.tokenize(text))
        spans, pos = [], 0
        for piece in pieces:
            found = text.find(str(piece), pos)
            if found != pos:  # the analyser normalised something: give up on its spans
                return fallback_segments(text)
            spans.append((pos, pos + len(str(piece))))
            pos += len(str(piece))
        return spans if pos == len(text) else fallback_segments(text)

    return segment


SEGMENTERS: dict[str, Callable[[], Segmenter | None]] = {"chinese": _jieba, "japanese": _janome}


def segmenter(script: str) -> Segmenter | None:
    """The segmenter registered for `script`, loaded once (None when its package is missing)."""
    with _lock:
        if script not in _loaded:
            _loaded[script] = SEGMENTERS[script]()
        return _loaded[script]


def _char_class(ch: str) -> str:
    code = ord(ch)
    if 0x3040 <= code <= 0x309F:
        return _HIRAGANA
    if 0x30A0 <= code <= 0x30FF:
        return _KATAKANA
    if 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF:
        return _HAN
    return ch  # punctuation and full-width forms: each its own class, so each its own word


def fallback_segments(text: str) -> list[tuple[int, int]]:
    """Runs of one character class, cut every `_MAX_FALLBACK_CHARS` characters."""
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or _char_class(text[i]) != _char_class(text[start]) or i - start >= _MAX_FALLBACK_CHARS:
            spans.append((start, i))
            start = i
    return spans


def segment_cjk(run: str) -> list[tuple[int, int]]:
    """Word spans of one CJK run (see the module docstring)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    japanese = _KANA_RE.search(run) is not None
    seg = segmenter("japanese" if japanese else "chinese") or fallback_segments
    for m in NUMERAL_RE.finditer(run):
        if m.start() > pos:
            spans.extend((pos + a, pos + b) for a, b in seg(run[pos : m.start()]))
        spans.append((m.start(), m.end()))
        pos = m.end()
    if pos < len(run):
        spans.extend((pos + a, pos + b) for a, b in seg(run[pos:]))
    return spans
