"""Prompt-lookup drafting: propose the tokens that followed the latest earlier occurrence of a sequence's
last n tokens, in its prompt or its own output. No draft model: document QA, RAG chat and program
outputs mostly copy names, figures and sentences of the prompt, and those copies come out several
tokens per step once the engine verifies the drafts (speculative.py, verify.py).

The index maps each n-gram (min_ngram <= n <= max_ngram) to the end of its latest occurrence that has a
continuation, over the sequence's resolved tokens only (tokens still on the device or still being
verified never enter it):

    tokens:   ... A B C x y ... A B C [?]          n = 3, suffix A B C
    index:    (A, B, C) -> e (the earlier C; the suffix's own C has no continuation yet, so it is not
              indexed and a suffix never matches itself)
    proposal: tokens[e + 1 : e + 1 + m] = x y ...

The suffix may reach past the resolved tokens into an assumed tail (the draft of the step still in
flight, taken as accepted); the continuation is read from resolved tokens + tail as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Drafter(Protocol):
    """Proposes draft tokens for one sequence from its token history. Host-side, pure Python."""

    def update(self, token_ids: Sequence[int], num_resolved: int) -> None:
        """`token_ids[:num_resolved]` are final (the first `num_resolved` may have grown since the last call)."""
        ...

    def propose(self, token_ids: Sequence[int], num_resolved: int, tail: Sequence[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that may follow `token_ids[:num_resolved] + tail` (empty: no proposal)."""
        ...


class PromptLookup:
    """The n-gram index of one sequence (see the module docstring). Longest n first, latest occurrence."""

    def __init__(self, token_ids: Sequence[int], min_ngram: int, max_ngram: int) -> None:
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self._latest: dict[tuple[int, ...], int] = {}
        """n-gram -> end index of its latest occurrence with at least one token after it."""
        self._num_indexed = 0
        """Tokens whose n-grams ending one position earlier are in `_latest`."""
        self.update(token_ids, len(token_ids))

    def update(self, token_ids: Sequence[int], num_resolved: int) -> None:
        # An n-gram ending at e is indexed once token e + 1 is resolved (it then has a continuation).
        latest = self._latest
        for end in range(max(self._num_indexed - 1, 0), num_resolved - 1):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                latest[tuple(token_ids[end - n + 1 : end + 1])] = end
        self._num_indexed = max(self._num_indexed, num_resolved)

    def propose(self, token_ids: Sequence[int], num_resolved: int, tail: Sequence[int], max_tokens: int) -> list[int]:
        if max_tokens < 1:
            return []
        history_len = num_resolved + len(tail)

        def at(i: int) -> int:
            return token_ids[i] if i < num_resolved else tail[i - num_resolved]

        for n in range(min(self.max_ngram, history_len), self.min_ngram - 1, -1):
            key = tuple(at(i) for i in range(history_len - n, history_len))
            end = self._latest.get(key)
            if end is not None:
                stop = min(end + 1 + max_tokens, history_len)
                return [at(i) for i in range(end + 1, stop)]
        return []


DRAFTERS = {"prompt_lookup": PromptLookup}
"""Drafting methods by `SpeculativeSettings.method`."""
