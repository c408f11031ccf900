"""`TextStream`: incremental detokenization with stop strings, for one request.

Decoding token by token breaks multi-byte characters and, for some tokenizers, leading spaces. The
stream keeps two offsets into its token list and only releases text once it is complete:

    tokens:  [ ... context ... | ... already emitted ... | new ]
                               ^ prefix_offset           ^ read_offset
    delta = decode(tokens[prefix_offset:]) minus decode(tokens[prefix_offset:read_offset]),
            held back while it ends in an incomplete character (U+FFFD).

Stop strings: text that could still become a stop string is held back; when one appears, the text
ends just before it and the stream reports the stop.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 4  # prompt tokens decoded with the first new tokens so leading spaces come out right


class TextStream:
    """Turns generated token ids into text deltas. Not thread-safe: one owner per request."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: tuple[str, ...] = (),
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self._tokens: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._text = ""  # complete decoded text so far (may include a stop string)
        self._num_emitted = 0  # characters of _text already returned as deltas
        self._stop_at: int | None = None

    @property
    def stopped(self) -> bool:
        return self._stop_at is not None

    @property
    def text(self) -> str:
        """The text so far: up to (not including) the stop string if one was hit."""
        return self._text if self._stop_at is None else self._text[: self._stop_at]

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one generated token; return (text safe to emit now, whether a stop string was hit)."""
        if self._stop_at is not None:
            return "", True
        self._tokens.append(token_id)
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return "", False  # an incomplete character: wait for the next token
        self._text += full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return self._release()

    def flush(self) -> str:
        """At the end of generation: release the held-back text (no stop string can complete now)."""
        if self._stop_at is not None:
            return ""
        delta = self._text[self._num_emitted :]
        self._num_emitted = len(self._text)
        return delta

    def _release(self) -> tuple[str, bool]:
        if self._stop:
            search_from = max(0, self._num_emitted - self._max_stop_len + 1)
            hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self._stop_at = min(hits)
                delta = self._text[self._num_emitted : self._stop_at]
                self._num_emitted = self._stop_at
                return delta, True
        safe_end = len(self._text) - self._held_back()
        delta = self._text[self._num_emitted : safe_end]
        self._num_emitted = max(self._num_emitted, safe_end)
        return delta, False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
