"""What a compression costs: tokenizer calls pinned, cached statistics equal to rebuilt ones, and the
offset-priced fit equal to the measured one."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from terse.compress import Budget, CompressorConfig, PromptCompressor, ProtectionPolicy
from terse.compress.rankers import BM25Ranker, terms
from terse.compress.tokenizer import CounterTarget, FastTokenizerTarget, TokenSpans
from tests.compress.checks import check_result
from tests.compress.corpus import make_docset

FREE = CompressorConfig(token_pruner=None, sentence_ranker="same")


class CountingTarget(FastTokenizerTarget):
    """A fast tokenizer that counts every call (a batch is one call)."""

    def __init__(self, tokenizer: object) -> None:
        super().__init__(tokenizer)
        self.num_calls = 0

    def count(self, text: str) -> int:
        self.num_calls += 1
        return super().count(text)

    def spans(self, text: str) -> TokenSpans:
        self.num_calls += 1
        return super().spans(text)

    def count_many(self, texts: Sequence[str]) -> list[int]:
        self.num_calls += 1
        return super().count_many(texts)


@pytest.fixture(scope="module")
def fast_tokenizer(tiny_llama: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_tokenizer_calls_per_compression_are_pinned(fast_tokenizer: object) -> None:
    target = CountingTarget(fast_tokenizer)
    compressor = PromptCompressor(None, target, FREE)
    data = make_docset(seed=3, num_docs=6, num_filler=4)
    compressor.compress(["warm up the constants."], budget=Budget(target_tokens=5), question="q?")
    target.num_calls = 0
    first = compressor.compress(data.docs, question=data.question, budget=Budget(target_tokens=80))
    # each new context: one tokenization with offsets and one batched edge check; then one count of
    # the verbatim parts and one verifying count of the final prompt
    assert target.num_calls == 2 * len(data.docs) + 2
    target.num_calls = 0
    again = compressor.compress(data.docs, question="Who likes sailing?", budget=Budget(rate=0.3))
    assert target.num_calls == 2  # the contexts recur: nothing about them is tokenized again
    for result in (first, again):
        check_result(result, data.docs, target.count)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [Budget(target_tokens=60), Budget(rate=0.5), Budget(rate=0.2)])
def test_offset_fit_equals_the_measured_fit(fast_tokenizer: object, seed: int, budget: Budget) -> None:
    """Priced from offsets, the fit keeps exactly what measuring every candidate would keep."""
    fast = FastTokenizerTarget(fast_tokenizer)
    measured = CounterTarget(fast.count)  # no offsets: every count is a real tokenization
    data = make_docset(seed=seed, num_docs=5, num_filler=3)
    for config in (FREE, CompressorConfig(ranker=None, sentence_ranker=None, token_pruner=None)):
        a = PromptCompressor(None, fast, config).compress(data.docs, question=data.question, budget=budget,
                                                          instruction="Answer from the documents.")
        b = PromptCompressor(None, measured, config).compress(data.docs, question=data.question, budget=budget,
                                                              instruction="Answer from the documents.")
        assert (a.text, a.num_original_tokens, a.num_compressed_tokens) == (
            b.text, b.num_original_tokens, b.num_compressed_tokens)
        assert [r.num_kept_tokens for r in a.reports] == [r.num_kept_tokens for r in b.reports]
        check_result(a, data.docs, fast.count)


def test_bm25_from_cached_statistics_equals_bm25s() -> None:
    from terse.retrieval.bm25s_import import load_bm25s

    bm25s = load_bm25s()
    rng = random.Random(0)
    vocab = ["alpha", "beta", "gamma", "delta", "works", "worked", "Paris", "Oslo", "the", "1958"]
    ranker = BM25Ranker()
    for _ in range(20):
        texts = [" ".join(rng.choices(vocab, k=rng.randint(0, 12))) for _ in range(rng.randint(1, 9))]
        question = " ".join(rng.choices(vocab, k=rng.randint(1, 5)))
        query = terms(question)
        if query:
            index = bm25s.BM25()
            index.index([terms(t) or ["\x00"] for t in texts], show_progress=False)
            expected = [float(s) for s in index.get_scores(query)]
        else:
            expected = [0.0] * len(texts)
        assert ranker.scores(texts, question) == expected
        assert ranker.scores(texts, question) == expected  # from the cache


def test_vectorised_priority_order_equals_the_per_word_key(counter: object) -> None:
    from terse.compress.fit import priority_order

    data = make_docset(seed=5, num_docs=6, num_filler=4)
    compressor = PromptCompressor(None, counter, FREE)  # type: ignore[arg-type]
    plans = [compressor._plan(i, t, ProtectionPolicy(numbers=True, literals=("Paris",)))
             for i, t in enumerate(data.docs)]
    plans[2].selected = False
    plans[1].rank, plans[3].rank = 3, 1
    num_sentences = plans[0].sentence_ids[-1] + 1
    plans[0].sentence_rank = {s: (s * 3) % num_sentences for s in range(num_sentences)}
    plans[0].sentence_kept = {1, 2}
    plans[0].question_sentences = {2}
    plans[4].word_keys = [float((7 * w) % 5) for w in range(len(plans[4].words))]
    expected = sorted(((i, w) for i, p in enumerate(plans) for w in range(len(p.words))),
                      key=lambda iw: (plans[iw[0]].priority(iw[1]), iw[0]))
    assert priority_order(plans) == expected
