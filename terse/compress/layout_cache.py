"""`LayoutCache`: parsed message layouts kept between requests by a long-lived chat hook.

A chat app resends its system prompt and the whole history with every turn, so most message texts a
proxy sees were parsed before. Layouts are pure functions of (text, options) and immutable, so a hit
returns the same object; the cache is bounded by characters of text, least recently used first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from terse.compress.layouts import MIN_PASSAGE_CHARS, Layout, parse_layout
from terse.errors import ConfigError

_Key = tuple[str, bool, int]


class LayoutCache:
    """`parse_layout` results by (text, whole_fallback, min_passage_chars). Thread-safe.

    Holds at most `max_entries` layouts and, past the latest one, `max_chars` characters of message
    text (a layout takes ~2-3 bytes per character: its text and its documents' texts)."""

    def __init__(self, max_chars: int = 2_000_000, max_entries: int = 1024) -> None:
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0:
            raise ConfigError(f"max_chars={max_chars!r} must be an int >= 0, e.g. 2_000_000")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ConfigError(f"max_entries={max_entries!r} must be an int >= 1, e.g. 1024")
        self.max_chars = max_chars
        self.max_entries = max_entries
        self._entries: OrderedDict[_Key, Layout] = OrderedDict()
        self._num_chars = 0
        self._lock = threading.Lock()

    def parse(self, text: str, *, whole_fallback: bool = False, min_passage_chars: int = MIN_PASSAGE_CHARS) -> Layout:
        """`parse_layout(text, ...)`, parsed once per text and options while it stays cached."""
        key = (text, whole_fallback, min_passage_chars)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        layout = parse_layout(text, whole_fallback=whole_fallback, min_passage_chars=min_passage_chars)
        with self._lock:
            if key not in self._entries:
                self._num_chars += len(text)
            self._entries[key] = layout
            while len(self._entries) > self.max_entries or (self._num_chars > self.max_chars and len(self._entries) > 1):
                self._num_chars -= len(self._entries.popitem(last=False)[0][0])
        return layout

    @property
    def num_chars(self) -> int:
        """Characters of message text held now."""
        return self._num_chars

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._num_chars = 0

    def __len__(self) -> int:
        return len(self._entries)
