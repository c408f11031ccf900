"""Short completions of a grammar: what a constrained request writes when its token budget runs out.

`ClosingPlanner.plan(matcher)` returns a token sequence that takes the matcher from where it stands to a
state where the grammar is complete (llguidance's `is_accepting`): for a half-written JSON value, the
closing quote and brackets plus any required property it still lacks, with the smallest value its schema
allows. The matcher is never changed: every search step works on copies (`deep_copy` shares the compiled
grammar, so a copy costs about a microsecond).

Two searches, both over single-byte tokens (every byte-level BPE has all 256) plus the grammar's forced
tokens (`compute_ff_tokens`: a property name the schema requires, the rest of an enum value):

    greedy   one path; at each free choice the first allowed byte of a fixed preference order
             (structural states: } ] , 0 " ...; inside free text such as a string: the closing quote
             first). Tens of microseconds; right for JSON, may loop on a regex (capped, then search).
    search   breadth-first over a few representative bytes per state (each punctuation byte, 0 1 9, a
             letter, ...), states of equal cost with the same token mask merged, a beam per cost level
             and a node budget. A few milliseconds; finds shorter plans (`{"a": 0}` rather than a string
             value) and paths a greedy walk misses (regexes such as `[a-z]+@[a-z]+\\.com`).

A plan found over single bytes is then re-tokenized into as few tokens as the vocabulary allows (dynamic
programming over the byte string) and checked against the grammar again, so `"}` costs one token where
the vocabulary has it.

Neither search is exhaustive: a grammar whose only completions need bytes the representatives skip, or
longer than `max_len`, gets no plan (None), and its requests are not closed (docs/structured.md).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

_STRUCTURAL_ORDER = b'}],0"' + b":123456789-.eE+ tfn" + bytes(range(97, 123)) + bytes(range(65, 91))
"""Greedy preference in structural states: close what is open, then the smallest JSON value (`0` before
`""`), then separators. Bytes not listed come after, in byte order."""
_FREE_ORDER = b'"' + _STRUCTURAL_ORDER
"""Greedy preference in free text (a string's content): leave it first."""
_FREE_PROBES = b"aQ~%"
"""A state that allows all of these bytes is free text (string content, a regex `.*`)."""
_SEARCH_RANK = b'"}],01:9 -.+eE\n' + b"tfn"
"""Search: representatives are tried in this order, then the rest in byte order."""
GREEDY_MAX_STEPS = 512
"""A greedy walk longer than this is taken for a loop and handed to the search."""
SEARCH_BEAM = 6
"""States expanded per cost level in the search."""
SEARCH_MAX_POPS = 600
"""States the search may take off its queue before giving up."""
SEARCH_MAX_CHILDREN = 12
"""Children per expanded state (one per class of bytes that act alike)."""
SEARCH_SHORTCUTS = 6
"""Multi-byte tokens tried per structural state besides the single bytes."""
MAX_GROUPS_FOR_SHORTCUTS = 8
"""A state with more classes of bytes than this is free text: no multi-byte shortcuts."""
_PROBE_BYTES = bytes(range(32, 127)) + b"\n\t"
"""Bytes whose acceptance makes a state's signature (printable ASCII, newline, tab)."""
_CLASS_CACHE_SIZE = 4096


def _raw_bound(max_len: int) -> int:
    """Tokens a path may take before re-tokenizing when it must fit `max_len` after: single-byte steps
    often merge (`ed` is one token where `e` `d` were two)."""
    return 2 * max_len + 8


def _preference(order: bytes) -> list[int]:
    seen: list[int] = []
    for b in list(order) + list(range(256)):
        if b not in seen:
            seen.append(b)
    return seen


class VocabBytes:
    """Byte tables of one tokenizer: its single-byte tokens and every token's bytes (for re-tokenizing)."""

    def __init__(self, ll_tokenizer: Any, vocab_size: int) -> None:
        self.single: dict[int, int] = {}
        """byte value -> a token that is exactly that byte."""
        self.by_bytes: dict[bytes, int] = {}
        """a token's bytes -> the token (the first of equal ones), special tokens left out."""
        self.lengths = np.zeros(vocab_size, dtype=np.int64)
        """[V] bytes per token (0: special, or beyond the tokenizer)."""
        self.first = np.zeros(vocab_size, dtype=np.int64)
        """[V] each token's first byte."""
        for token in range(min(vocab_size, int(ll_tokenizer.vocab_size))):
            if ll_tokenizer.is_special_token(token):
                continue
            raw = bytes(ll_tokenizer.decode_bytes([token]))
            if raw:
                self.by_bytes.setdefault(raw, token)
                self.lengths[token], self.first[token] = len(raw), raw[0]
                if len(raw) == 1:
                    self.single.setdefault(raw[0], token)
        self.max_token_len = max((len(b) for b in self.by_bytes), default=1)
        ids = sorted(self.single.values())
        self.single_ids = np.asarray(ids, dtype=np.int64)
        """[S] the single-byte tokens, ascending."""
        self.single_bytes = [next(b for b, t in self.single.items() if t == i) for i in ids]
        """byte of each entry of single_ids."""


class ByteClasses:
    """Per grammar: state signature -> representative tokens (one per class of bytes that act alike).
    Bounded; safe to share between threads (single dict operations)."""

    def __init__(self) -> None:
        self._reps: dict[int, list[int]] = {}

    def get(self, signature: int) -> list[int] | None:
        return self._reps.get(signature)

    def put(self, signature: int, reps: list[int]) -> None:
        if len(self._reps) >= _CLASS_CACHE_SIZE:
            self._reps.clear()  # rare: a grammar with thousands of distinct states; start over
        self._reps[signature] = reps


class ClosingPlanner:
    """Finds short grammar completions for one tokenizer. Thread-safe (no mutable state after init)."""

    def __init__(self, ll_tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tok = ll_tokenizer
        self.vocab = VocabBytes(ll_tokenizer, vocab_size)
        self.eos_ids = frozenset(int(t) for t in eos_token_ids) or frozenset([int(ll_tokenizer.eos_token)])
        """The tokens that end a request."""
        self.eos = min(self.eos_ids)
        """The one used to check that a plan ends where the grammar is complete, and to end a request
        whose grammar is complete when nothing else fits."""
        single = self.vocab.single
        self._structural = [single[b] for b in _preference(_STRUCTURAL_ORDER) if b in single]
        self._free = [single[b] for b in _preference(_FREE_ORDER) if b in single]
        self._probes = [single[b] for b in _FREE_PROBES if b in single]
        self._byte_rank = {b: i for i, b in enumerate(_preference(_SEARCH_RANK))}
        self._byte_rank_array = np.asarray([self._byte_rank[b] for b in range(256)], dtype=np.int64)
        self._rank = {single[b]: i for b, i in self._byte_rank.items() if b in single}
        probes = [b for b in _PROBE_BYTES if b in single]
        self._probe_bits = [(1 << (i + 1), single[b]) for i, b in enumerate(probes)]
        """(signature bit, token) per probe byte; bit 0 of a signature is `is_accepting`."""

    # -- public ------------------------------------------------------------------------------------
    def plan(self, matcher: Any, max_len: int, classes: ByteClasses | None = None) -> list[int] | None:
        """A completion of at most `max_len` tokens, quickly: the greedy walk, the search only when the
        walk fails. None when neither finds one. `matcher` is not changed."""
        path = self.greedy(matcher, _raw_bound(max_len))
        if path is None:
            path = self.search(matcher, _raw_bound(max_len), classes)
        return None if path is None else self.compact(matcher, path)

    def fit(
        self, matcher: Any, max_len: int, classes: ByteClasses | None = None, max_pops: int = SEARCH_MAX_POPS
    ) -> list[int] | None:
        """A completion of at most `max_len` tokens, trying hard: `plan`, then the search (`max_pops`
        states at most) when the plan is too long (the search often finds a shorter one). None when
        neither fits."""
        path = self.plan(matcher, max_len, classes)
        if path is not None and len(path) <= max_len:
            return path
        found = self.search(matcher, _raw_bound(max_len), classes, max_pops)
        if found is None:
            return None
        found = self.compact(matcher, found)
        return found if len(found) <= max_len else None

    def shortest(self, matcher: Any, max_len: int, classes: ByteClasses | None = None) -> list[int] | None:
        """The shorter of the greedy and the search completions (at most `max_len` tokens), or None."""
        best = self.plan(matcher, max_len, classes)
        if best is not None and not best:
            return best
        found = self.search(matcher, _raw_bound(max_len if best is None else len(best) - 1), classes)
        if found is not None:
            found = self.compact(matcher, found)
            if best is None or len(found) < len(best):
                best = found
        return best

    def completes(self, matcher: Any, tokens: Sequence[int]) -> bool:
        """Whether `tokens` take the matcher to a complete grammar (checked, matcher unchanged)."""
        return bool(matcher.validate_tokens([*tokens, self.eos]) == len(tokens) + 1)

    # -- greedy --------------------------------------------------------------------------------------
    def greedy(self, matcher: Any, max_len: int) -> list[int] | None:
        """One path by fixed preferences; None when it is longer than `max_len` or gets stuck."""
        m = matcher.deep_copy()
        path: list[int] = []
        cap = min(max_len, GREEDY_MAX_STEPS)
        while not m.is_accepting():
            if len(path) >= cap or m.is_stopped():
                return None
            forced = m.compute_ff_tokens()
            if forced:
                num = int(m.try_consume_tokens(forced))
                if num:
                    path.extend(forced[:num])
                    continue
            token = self._greedy_choice(m)
            if token is None or not m.consume_token(token):
                return None
            path.append(token)
        return path if len(path) <= max_len else None

    def _greedy_choice(self, m: Any) -> int | None:
        free = bool(self._probes) and all(m.validate_tokens([t]) == 1 for t in self._probes)
        for token in self._free if free else self._structural:
            if m.validate_tokens([token]) == 1:
                return token
        allowed = self._allowed_any(m, 1)
        return allowed[0] if allowed else None

    # -- search --------------------------------------------------------------------------------------
    def search(
        self, matcher: Any, max_len: int, classes: ByteClasses | None = None, max_pops: int = SEARCH_MAX_POPS
    ) -> list[int] | None:
        """Breadth-first by token count (see the module docstring); None when nothing within `max_len`
        tokens was found inside the node budget (`max_pops` states). `classes` caches which bytes act
        alike in a state (pass the same object for every search over one grammar)."""
        classes = classes if classes is not None else ByteClasses()
        order = itertools.count()
        queue: list[tuple[int, int, list[int], Any]] = [(0, next(order), [], matcher.deep_copy())]
        seen: set[tuple[int, int]] = set()
        per_level: dict[int, int] = {}
        for _ in range(max_pops):
            if not queue:
                return None
            cost, _, path, m = heapq.heappop(queue)
            if m.is_accepting():
                return path
            if m.is_stopped() or m.is_error():
                continue
            forced = m.compute_ff_tokens()
            if forced:
                num = int(m.try_consume_tokens(forced))
                if num and cost + num <= max_len:
                    heapq.heappush(queue, (cost + num, next(order), path + forced[:num], m))
                if num:
                    continue
            if cost >= max_len or per_level.get(cost, 0) >= SEARCH_BEAM:
                continue
            signature = self._signature(m)
            if (signature, cost) in seen:  # same allowed bytes at the same cost: most likely the same state
                continue
            seen.add((signature, cost))
            per_level[cost] = per_level.get(cost, 0) + 1
            for token in self._representatives(m, signature, classes):
                child = m.deep_copy()
                if child.consume_token(token):
                    heapq.heappush(queue, (cost + 1, next(order), [*path, token], child))
        return None

    def _signature(self, m: Any) -> int:
        """Which probe bytes the state allows (one bit each) and whether it is complete (bit 0)."""
        sig = int(m.is_accepting())
        for bit, token in self._probe_bits:
            if m.validate_tokens([token]) == 1:
                sig |= bit
        return sig

    def _representatives(self, m: Any, signature: int, classes: ByteClasses) -> list[int]:
        """One allowed token per class of bytes that lead to the same next signature, best ranked
        first; classes are worked out once per signature (`classes`) by trying every allowed byte.
        Without an allowed probe byte: the shortest allowed tokens."""
        known = classes.get(signature)
        if known is not None:
            return known
        groups: dict[int, int] = {}
        for bit, token in self._probe_bits:
            if signature & bit:
                child = m.deep_copy()
                if child.consume_token(token):
                    groups.setdefault(self._signature(child), token)
        reps = sorted(groups.values(), key=lambda t: self._rank[t])[:SEARCH_MAX_CHILDREN]
        if not reps:
            reps = self._allowed_any(m, SEARCH_MAX_CHILDREN)
        elif len(groups) <= MAX_GROUPS_FOR_SHORTCUTS:
            reps += self._shortcuts(m)
        classes.put(signature, reps)
        return reps

    def _shortcuts(self, m: Any) -> list[int]:
        """Allowed tokens of 2-4 bytes in a structural state (` 3` after `"x":` where the vocabulary
        merges the space with the digit), best-ranked first byte, then shortest."""
        allowed = self._allowed_ids(m)
        lengths = self.vocab.lengths[allowed]
        picked = allowed[(lengths >= 2) & (lengths <= 4)]
        order = np.lexsort((self.vocab.lengths[picked], self._byte_rank_array[self.vocab.first[picked]]))
        return [int(t) for t in picked[order[:SEARCH_SHORTCUTS]]]

    def _allowed_ids(self, m: Any) -> np.ndarray:
        """[A] int64: the tokens the state allows (one mask computation)."""
        words = np.frombuffer(bytes(m.compute_bitmask()), dtype=np.uint32)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: len(self.vocab.lengths)]
        return np.flatnonzero(bits).astype(np.int64)

    def _allowed_any(self, m: Any, limit: int) -> list[int]:
        """Up to `limit` allowed tokens of any length, shortest first (EOS and special tokens left out)."""
        allowed = self._allowed_ids(m)
        allowed = allowed[self.vocab.lengths[allowed] > 0]
        order = np.argsort(self.vocab.lengths[allowed], kind="stable")
        return [int(t) for t in allowed[order[:limit]]]

    # -- re-tokenizing -------------------------------------------------------------------------------
    def compact(self, matcher: Any, path: list[int]) -> list[int]:
        """`path`'s bytes in as few tokens as the vocabulary allows, when the grammar accepts that
        tokenization too; else `path` itself."""
        if len(path) < 2:
            return path
        raw = bytes(self._tok.decode_bytes(path))
        shorter = self._fewest_tokens(raw)
        if shorter is not None and len(shorter) < len(path) and self.completes(matcher, shorter):
            return shorter
        return path

    def _fewest_tokens(self, raw: bytes) -> list[int] | None:
        """Fewest tokens whose bytes concatenate to `raw` (dynamic programming over end positions)."""
        n = len(raw)
        best: list[tuple[int, int, int] | None] = [None] * (n + 1)  # (tokens so far, start, token)
        best[0] = (0, 0, -1)
        by_bytes, longest = self.vocab.by_bytes, self.vocab.max_token_len
        for end in range(1, n + 1):
            for start in range(max(0, end - longest), end):
                prev = best[start]
                token = by_bytes.get(raw[start:end]) if prev is not None else None
                if prev is not None and token is not None and (best[end] is None or prev[0] + 1 < best[end][0]):  # type: ignore[index]
                    best[end] = (prev[0] + 1, start, token)
        if best[n] is None:
            return None
        out: list[int] = []
        end = n
        while end > 0:
            entry = best[end]
            assert entry is not None
            out.append(entry[2])
            end = entry[1]
        return out[::-1]
