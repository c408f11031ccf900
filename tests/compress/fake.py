"""A deterministic scorer: one token per word, capitalised words surprising, every call recorded."""

from __future__ import annotations

import re
from collections.abc import Sequence

from terse.backend.base import BackendBase
from terse.backend.handle import RequestHandle
from terse.backend.types import Message, SamplingParams, TokenScores
from terse.errors import InvalidRequestError, UnsupportedOperationError

_TOKEN_RE = re.compile(r"\S+")


class WordScorer(BackendBase):
    """log P = -8 for words starting with a capital letter or digit, -0.5 otherwise."""

    def __init__(self, max_len: int = 4096) -> None:
        self.calls: list[tuple[tuple[str, ...], str]] = []
        self._max_len = max_len

    @property
    def model_name(self) -> str:
        return "word-scorer"

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def score(self, texts: Sequence[str], *, prefix: str = "") -> list[TokenScores]:
        self.calls.append((tuple(texts), prefix))
        out = []
        for text in texts:
            if self.count_tokens(prefix) + self.count_tokens(text) > self._max_len:
                raise InvalidRequestError(f"prefix + text over the window of {self._max_len}")
            spans = [(m.start(), m.end()) for m in _TOKEN_RE.finditer(text)]
            lps = [-8.0 if text[a].isupper() or text[a].isdigit() else -0.5 for a, _ in spans]
            out.append(TokenScores(tuple(range(len(spans))), tuple(lps), tuple(spans)))
        return out

    def encode(self, text: str) -> list[int]:
        return list(range(len(_TOKEN_RE.findall(text))))

    def decode(self, token_ids: Sequence[int]) -> str:
        raise UnsupportedOperationError("WordScorer cannot decode")

    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestHandle:
        raise UnsupportedOperationError("WordScorer only scores")

    def render_chat(self, messages: Sequence[Message]) -> str:
        return "\n".join(m["content"] for m in messages)
