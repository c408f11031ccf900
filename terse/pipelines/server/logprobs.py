"""Generated tokens' log-probabilities in OpenAI's two shapes: chat (`logprobs.content[]`) and
completions (`tokens` / `token_logprobs` / `top_logprobs` / `text_offset`).

A token's text is the backend's decoding of that token alone, so a byte-level token holding part of a
multi-byte character reads as U+FFFD; `bytes` are that text's UTF-8 bytes. A log-probability of -inf
(a token the model gives no mass) is reported as -9999.0: JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from terse.backend.types import TokenLogprob

_FLOOR = -9999.0


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _FLOOR


class TokenTexts:
    """Each token id's text, decoded once per request."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._decode([token_id])
        return text


def _chat_token(token_id: int, logprob: float, texts: TokenTexts) -> dict[str, Any]:
    text = texts(token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    """The `logprobs` object of a chat choice (or of one stream chunk's choice)."""
    content = [
        {
            **_chat_token(e.token_id, e.logprob, texts),
            "top_logprobs": [_chat_token(t, lp, texts) for t, lp in e.top],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: Sequence[TokenLogprob], texts: TokenTexts, num_top: int, text_offset: int = 0
) -> dict[str, Any]:
    """The `logprobs` object of a completions choice; offsets count from `text_offset` (the echo's length)."""
    tokens = [texts(e.token_id) for e in entries]
    offsets: list[int] = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    top: list[dict[str, float]] | None = None
    if num_top > 0:
        top = []
        for e in entries:
            alternatives: dict[str, float] = {}
            for t, lp in e.top:  # most likely first; two ids with one text keep the likelier
                alternatives.setdefault(texts(t), _finite(lp))
            top.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(e.logprob) for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }
