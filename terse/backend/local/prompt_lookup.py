"""Prompt-lookup drafting: propose the tokens that followed the latest earlier occurrence of a sequence's
last n tokens, in its prompt or its own output. No draft model: document QA, RAG chat and program
outputs mostly copy names, figures and sentences of the prompt, and those copies come out several
tokens per step once the engine verifies the drafts (speculative.py, verify.py).

A proposal looks for the latest occurrence of each n-gram (min_ngram <= n <= max_ngram, longest first)
that has a continuation, among the sequence's resolved tokens only (tokens still on the device or still
being verified never enter the lookup):

    tokens:   ... A B C x y ... A B C [?]          n = 3, suffix A B C
    match:    e = the earlier C (the suffix's own C has no continuation yet, so a suffix never matches
              itself)
    proposal: tokens[e + 1 : e + 1 + m] = x y ...

The suffix may reach past the resolved tokens into an assumed tail (the draft of the step still in
flight, taken as accepted); the continuation is read from resolved tokens + tail as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Drafter(Protocol):
    """Proposes draft tokens for one sequence from its token history. Host-side, pure Python."""

    def update(self, token_ids: Sequence[int], num_resolved: int) -> None:
        """`token_ids[:num_resolved]` are final (the first `num_resolved` may have grown since the last call)."""
        ...

    def propose(self, token_ids: Sequence[int], num_resolved: int, tail: Sequence[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that may follow `token_ids[:num_resolved] + tail` (empty: no proposal)."""
        ...


class PromptLookup:
    """The lookup of one sequence (see the module docstring). Longest n first, latest occurrence.

    No n-gram table: the resolved tokens are kept in a numpy array and each proposal compares the suffix
    against views of it, shifted n ways (~15-30 us for a few thousand tokens). Building a table of every n-gram of
    a 2.5K-token prompt in Python cost ~2-4 ms per request, which at batch 16 on a GPU outweighed what
    the drafts saved."""

    def __init__(self, token_ids: Sequence[int], min_ngram: int, max_ngram: int) -> None:
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self._tokens = np.empty(max(len(token_ids), 16) * 2, dtype=np.int64)
        self._num_resolved = 0
        self.update(token_ids, len(token_ids))

    def update(self, token_ids: Sequence[int], num_resolved: int) -> None:
        start = self._num_resolved
        if num_resolved <= start:
            return
        if num_resolved > len(self._tokens):
            grown = np.empty(num_resolved * 2, dtype=np.int64)
            grown[:start] = self._tokens[:start]
            self._tokens = grown
        self._tokens[start:num_resolved] = token_ids[start:num_resolved]
        self._num_resolved = num_resolved

    def propose(self, token_ids: Sequence[int], num_resolved: int, tail: Sequence[int], max_tokens: int) -> list[int]:
        if max_tokens < 1:
            return []
        resolved = min(num_resolved, self._num_resolved)  # what the lookup covers
        history_len = num_resolved + len(tail)

        def at(i: int) -> int:
            return int(token_ids[i]) if i < num_resolved else int(tail[i - num_resolved])

        longest = min(self.max_ngram, history_len)
        # Candidate ends e in [0, resolved - 2] (a resolved continuation follows). match[n] marks the e
        # whose n-gram tokens[e - n + 1 : e + 1] equals the history's last n tokens, over e in
        # [n - 1, resolved - 2]: each n extends the n - 1 marks by one shifted comparison of views.
        num_ends = resolved - 1
        if num_ends < 1 or longest < self.min_ngram:
            return []
        tokens = self._tokens
        matches: list[np.ndarray] = []
        match = tokens[:num_ends] == at(history_len - 1)
        matches.append(match)
        for back in range(1, longest):
            if num_ends - back < 1 or not match.any():
                break
            match = match[1:] & (tokens[: num_ends - back] == at(history_len - 1 - back))
            matches.append(match)
        for n in range(len(matches), self.min_ngram - 1, -1):
            match = matches[n - 1]
            last = match.size - 1 - int(match[::-1].argmax())  # the latest hit, if any
            if match[last]:
                end = last + n - 1
                stop = min(end + 1 + max_tokens, history_len)
                return [at(i) for i in range(end + 1, stop)]
        return []


DRAFTERS = {"prompt_lookup": PromptLookup}
"""Drafting methods by `SpeculativeSettings.method`."""
