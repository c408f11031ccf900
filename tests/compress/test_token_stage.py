"""The token-level stage: surprisal ranking, the budget controller, prefix reuse, windows, real scorers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from terse.backend.base import Backend
from terse.compress import Budget, CompressorConfig, PromptCompressor, ProtectionPolicy
from terse.compress.words import split_words
from tests.compress.checks import check_result, words_of
from tests.compress.corpus import make_docset
from tests.compress.fake import WordScorer

Counter = Callable[[str], int]

# 1 capitalised word in 4; a 0.25 budget over the context is exactly the surprising words.
TEXT = " ".join(f"Cap{i} low{i}a low{i}b low{i}c" for i in range(60))


@pytest.mark.parametrize("pruner", ["iterative", "parallel"])
def test_surprising_words_are_kept_first(pruner: str) -> None:
    scorer = WordScorer()
    config = CompressorConfig(ranker=None, sentence_ranker=None, token_pruner=pruner, segment_tokens=16)
    result = PromptCompressor(scorer, config=config).compress(TEXT, budget=Budget(target_tokens=60))
    assert result.num_compressed_tokens == 60
    # quotas are per segment (~16 words, not a multiple of 4), so a segment with 3 capitalised words
    # may keep one plain word; globally the surprising words dominate
    kept = words_of(result.text)
    assert sum(w.startswith("Cap") for w in kept) >= 54


def test_iterative_prefixes_extend_each_other_and_start_with_the_question() -> None:
    scorer = WordScorer()
    config = CompressorConfig(ranker=None, sentence_ranker=None, token_pruner="iterative", segment_tokens=16)
    PromptCompressor(scorer, config=config).compress(TEXT, question="Which caps?", budget=Budget(rate=0.25))
    prefixes = [prefix for _, prefix in scorer.calls]
    assert len(prefixes) >= 10  # 240 words in segments of ~16
    assert all(p.startswith("Which caps?\n\n") for p in prefixes)
    # each call's prefix is the previous one plus the words kept from the previous segment
    assert all(b.startswith(a) for a, b in zip(prefixes, prefixes[1:]))
    carried = prefixes[-1].split()[2:]
    assert sum(w.startswith("Cap") for w in carried) >= 0.9 * len(carried)


def test_prefix_window_restarts_when_kept_text_outgrows_it() -> None:
    scorer = WordScorer()
    config = CompressorConfig(ranker=None, sentence_ranker=None, token_pruner="iterative", segment_tokens=16,
                              max_prefix_tokens=20)
    result = PromptCompressor(scorer, config=config).compress(TEXT, budget=Budget(rate=0.25))
    assert max(len(prefix.split()) for _, prefix in scorer.calls) <= 20
    assert sum(w.startswith("Cap") for w in words_of(result.text)) >= 54


def test_controller_spends_what_mandatory_words_left() -> None:
    # the user's patterns (mandatory) take part of the budget; the controller still lands on the plan
    text = " ".join(f"Cap{i} low {i} more" for i in range(50))
    scorer = WordScorer()
    config = CompressorConfig(ranker=None, sentence_ranker=None, token_pruner="iterative", segment_tokens=16)
    result = PromptCompressor(scorer, config=config).compress(
        text, budget=Budget(target_tokens=100), protect=ProtectionPolicy(patterns=(r"\b\d+\b",)))
    kept = words_of(result.text)
    assert result.num_compressed_tokens == 100
    assert [w for w in kept if w.isdigit()] == [str(i) for i in range(50)]
    assert sum(w.startswith("Cap") for w in kept) >= 45


def test_controller_spends_what_structural_spans_kept_first_left() -> None:
    # protected numbers (kept first, by default) take part of the budget; the controller lands on the plan
    text = " ".join(f"Cap{i} low {i} more" for i in range(50))
    config = CompressorConfig(ranker=None, sentence_ranker=None, token_pruner="iterative", segment_tokens=16)
    result = PromptCompressor(WordScorer(), config=config).compress(
        text, budget=Budget(target_tokens=100), protect=ProtectionPolicy(numbers=True))
    kept = words_of(result.text)
    assert result.num_compressed_tokens == 100
    assert [w for w in kept if w.isdigit()] == [str(i) for i in range(50)]
    assert sum(w.startswith("Cap") for w in kept) == 50


@pytest.mark.parametrize("pruner", ["iterative", "parallel"])
def test_structural_spans_are_ranked_by_surprisal_like_their_neighbours(pruner: str) -> None:
    # ranked with their context, inline code is atomic, not privileged: at a budget of the surprising words only, the
    # unsurprising code spans go, each whole
    text = " ".join(f"Cap{i} low{i}a `low{i}b low{i}c`" for i in range(60))
    config = CompressorConfig(ranker=None, sentence_ranker=None, token_pruner=pruner, segment_tokens=16)
    result = PromptCompressor(WordScorer(), config=config).compress(
        text, budget=Budget(target_tokens=60), protect=ProtectionPolicy(code_blocks=True, rank_with_context=True))
    kept = result.text
    assert result.num_compressed_tokens == 60
    assert sum(w.startswith("Cap") for w in words_of(kept)) >= 54
    for i in range(60):
        assert (f"`low{i}b" in kept) == (f"low{i}c`" in kept) == (f"`low{i}b low{i}c`" in kept)


@pytest.mark.parametrize("pruner", ["iterative", "parallel"])
@pytest.mark.parametrize("ranker", ["lm", "bm25"])
def test_real_scorer_meets_budgets(hf_scorer: Backend, pruner: str, ranker: str) -> None:
    data = make_docset(seed=4, num_docs=6)
    config = CompressorConfig(ranker=ranker, sentence_ranker="same", token_pruner=pruner)
    compressor = PromptCompressor(hf_scorer, config=config)
    for budget in (Budget(rate=0.2), Budget(target_tokens=90)):
        result = compressor.compress(data.docs, question=data.question, budget=budget)
        check_result(result, data.docs, hf_scorer.count_tokens)
        assert set(result.timings) >= {"coarse", "sentence", "token", "fit", "total"}
        assert sorted(r.rank for r in result.reports) == list(range(6))


def test_target_tokenizer_differs_from_the_scorers(hf_scorer: Backend, counter: Counter) -> None:
    data = make_docset(seed=5, num_docs=4)
    def words(text: str) -> int:
        return len(split_words(text))
    compressor = PromptCompressor(hf_scorer, target_tokenizer=words, config=CompressorConfig(ranker="bm25"))
    result = compressor.compress(data.docs, question=data.question, budget=Budget(target_tokens=50))
    assert result.num_compressed_tokens == words(result.text) <= 50
    assert result.num_original_tokens == words("\n\n".join([*data.docs, data.question]))


def test_inputs_longer_than_the_scorer_window_are_chunked(small_window_scorer: Backend) -> None:
    data = make_docset(seed=6, num_docs=2, num_filler=6)
    docs = [data.docs[0] * 3, data.docs[1]]
    assert small_window_scorer.count_tokens(docs[0]) > 2 * small_window_scorer.max_model_len
    for ranker, pruner in (("lm", "iterative"), ("bm25", "parallel")):
        config = CompressorConfig(ranker=ranker, sentence_ranker="bm25", token_pruner=pruner, segment_tokens=128)
        result = PromptCompressor(small_window_scorer, config=config).compress(
            docs, question=data.question, budget=Budget(rate=0.3))
        check_result(result, docs, small_window_scorer.count_tokens)


def test_non_ascii_with_a_real_scorer(hf_scorer: Backend) -> None:
    docs = ["東京は日本の首都です。人口はとても多いです。" * 4, "Les élèves étudient à l'université. " * 4]
    compressor = PromptCompressor(hf_scorer, config=CompressorConfig(ranker="lm"))
    result = compressor.compress(docs, question="Où étudient les élèves?", budget=Budget(rate=0.4))
    check_result(result, docs, hf_scorer.count_tokens)
    assert "\ufffd" not in result.text


def test_iterative_prefixes_hit_the_local_engines_prefix_cache(tiny_llama: object) -> None:
    import terse

    engine = terse.load_backend(f"local:{tiny_llama}")
    try:
        data = make_docset(seed=8, num_docs=4, num_filler=6)
        config = CompressorConfig(token_pruner="iterative", segment_tokens=32)
        question = f"{data.question} Answer with the company name only, as it is written in the documents."
        before = engine.stats["num_cached_tokens"]  # type: ignore[attr-defined]
        result = PromptCompressor(engine, config=config).compress(data.docs, question=question, budget=Budget(rate=0.3))
        check_result(result, data.docs, engine.count_tokens)
        # each segment's prefix (question + kept text) was prefilled by the call before it
        assert engine.stats["num_cached_tokens"] - before > 0  # type: ignore[attr-defined]
    finally:
        engine.close()


@pytest.mark.parametrize("pruner", ["iterative", "parallel"])
def test_words_the_question_names_are_ranked_first(pruner: str) -> None:
    question = "What happened to low7b and low30c?"
    for keep_terms in (True, False):
        config = CompressorConfig(ranker=None, sentence_ranker=None, token_pruner=pruner, segment_tokens=16,
                                  keep_question_terms=keep_terms)
        result = PromptCompressor(WordScorer(), config=config).compress(TEXT, question=question, budget=Budget(
            target_tokens=60 + len(question.split())))
        kept = words_of(result.contexts[0])
        assert ("low7b" in kept and "low30c" in kept) == keep_terms
