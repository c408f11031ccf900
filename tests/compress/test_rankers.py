"""Rankers put the gold document first on a generated multi-document set; the LM ranker's contract."""

from __future__ import annotations

import math

import pytest

from terse.backend.base import Backend
from terse.compress import Budget, CompressorConfig, PromptCompressor
from terse.compress.rankers import BM25Ranker, EmbeddingRanker, LMRanker, build_ranker, terms
from terse.errors import ConfigError
from tests.compress.corpus import make_docset


def test_terms_split_cjk_and_drop_stopwords() -> None:
    assert terms("Where does Alice work at Acme-Corp?") == ["alice", "work", "acme", "corp"]
    assert terms("東京です") == ["東", "京", "で", "す"]


@pytest.mark.parametrize("ranker", [BM25Ranker(), EmbeddingRanker()], ids=["bm25", "embedding"])
def test_gold_document_ranks_first(ranker: BM25Ranker | EmbeddingRanker) -> None:
    for seed in range(3):
        data = make_docset(seed=seed, num_docs=10)
        scores = ranker.scores(data.docs, data.question)
        assert max(range(10), key=lambda i: scores[i]) == data.gold, seed


def test_rankers_without_a_question_or_texts() -> None:
    assert BM25Ranker().scores(["a b", ""], "") == [0.0, 0.0]
    assert BM25Ranker().scores([], "q") == []
    assert BM25Ranker().scores(["", "alpha beta"], "alpha")[1] > 0.0  # empty documents are allowed


def test_lm_ranker_scores_the_question_given_each_text(hf_scorer: Backend) -> None:
    data = make_docset(seed=1, num_docs=4)
    scores = LMRanker(hf_scorer).scores([*data.docs, data.docs[0] * 12], data.question)
    assert len(scores) == 5 and all(math.isfinite(s) and s < 0 for s in scores)  # mean log-probabilities
    assert LMRanker(hf_scorer).scores(data.docs, "") == [0.0] * 4


def test_unknown_or_unavailable_rankers_fail_helpfully() -> None:
    with pytest.raises(ConfigError, match="unknown ranker 'tfidf'"):
        build_ranker("tfidf", CompressorConfig(), None)
    with pytest.raises(ConfigError, match="needs a scorer"):
        PromptCompressor(None, len, CompressorConfig(ranker="lm", token_pruner=None))
    with pytest.raises(ConfigError, match="needs a scorer"):
        PromptCompressor(None, len, CompressorConfig(ranker="bm25", token_pruner="iterative"))


def test_embedding_ranked_compression_keeps_the_gold_document(counter: object) -> None:
    data = make_docset(seed=21, num_docs=8)
    compressor = PromptCompressor(None, counter, CompressorConfig(ranker="embedding", token_pruner=None))  # type: ignore[arg-type]
    result = compressor.compress(data.docs, question=data.question, budget=Budget(rate=0.25))
    assert result.context_order[0] == data.gold and data.answer in result.text
