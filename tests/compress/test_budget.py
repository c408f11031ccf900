"""Exact budgets in a real tokenizer, protection and edge inputs, with scorer-free stages (BM25)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from terse.compress import Budget, CompressorConfig, PromptCompressor, ProtectionPolicy
from terse.errors import InvalidRequestError
from tests.compress.checks import check_result, words_of
from tests.compress.corpus import make_docset

Counter = Callable[[str], int]


def _compressor(counter: Counter, **overrides: object) -> PromptCompressor:
    config = CompressorConfig(**{"ranker": "bm25", "token_pruner": None, **overrides})  # type: ignore[arg-type]
    return PromptCompressor(None, counter, config)


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("num_docs", [1, 8])
def test_rate_budgets_are_met_exactly(counter: Counter, rate: float, num_docs: int) -> None:
    data = make_docset(seed=num_docs, num_docs=num_docs)
    result = _compressor(counter).compress(
        data.docs, question=data.question, instruction="Answer from the documents.", budget=Budget(rate=rate)
    )
    check_result(result, data.docs, counter)
    assert result.text.startswith("Answer from the documents.")
    assert result.text.endswith(data.question)


@pytest.mark.parametrize("target", [40, 75, 120, 333])
@pytest.mark.parametrize("reorder", ["original", "rank", "ends"])
def test_target_budgets_are_met_exactly(counter: Counter, target: int, reorder: str) -> None:
    data = make_docset(seed=target, num_docs=6)
    result = _compressor(counter, reorder=reorder).compress(
        data.docs, question=data.question, budget=Budget(target_tokens=target)
    )
    check_result(result, data.docs, counter)
    assert result.target_tokens == target


def test_without_any_stage_the_fit_alone_meets_the_budget(counter: Counter) -> None:
    data = make_docset(seed=3)
    compressor = _compressor(counter, ranker=None, sentence_ranker=None)
    for rate in (0.15, 0.6):
        check_result(compressor.compress(data.docs, budget=Budget(rate=rate)), data.docs, counter)


def test_gold_document_survives_and_comes_first(counter: Counter) -> None:
    for seed in range(5):
        data = make_docset(seed=seed, num_docs=10)
        result = _compressor(counter).compress(data.docs, question=data.question, budget=Budget(rate=0.2))
        assert result.reports[data.gold].rank == 0
        assert result.context_order[0] == data.gold
        assert data.answer in result.text


def test_protected_spans_are_always_present_whole(counter: Counter) -> None:
    docs = [
        "Order ORDER-7731 shipped on 2026-11-21 for $1,234.50 to Acme Corp. The parcel was small and brown.\n"
        "```python\ndef total(xs):\n    return sum(xs)\n```\nThe end of the note, with many more words after it.",
        'Data: {"user_id": 42, "plan": "pro"} and a long sentence that nobody needs at all in the result.',
    ]
    policy = ProtectionPolicy(literals=("Acme Corp",), patterns=(r"ORDER-\d+",), numbers=True, code_blocks=True,
                              json_keys=True)
    compressor = _compressor(counter, ranker=None, sentence_ranker=None)
    for rate in (0.6, 0.8):
        result = compressor.compress(docs, budget=Budget(rate=rate), protect=policy)
        check_result(result, docs, counter, slack=None)
        for span in ("ORDER-7731", "2026-11-21", "$1,234.50", "Acme Corp", '"user_id":', '"plan":', "42",
                     "```python\ndef total(xs):\n    return sum(xs)\n```"):
            assert span in result.text, span
    with pytest.raises(InvalidRequestError, match="protected spans alone"):
        compressor.compress(docs, budget=Budget(target_tokens=10), protect=policy)


def test_user_literals_are_kept_even_in_dropped_contexts(counter: Counter) -> None:
    data = make_docset(seed=1, num_docs=8)
    docs = list(data.docs)
    docs[(data.gold + 1) % len(docs)] += " The code word is ZEBRA-99."
    policy = ProtectionPolicy(literals=("ZEBRA-99",))
    result = _compressor(counter).compress(docs, question=data.question, budget=Budget(rate=0.15), protect=policy)
    assert "ZEBRA-99" in result.text
    check_result(result, docs, counter, slack=None)


def test_markdown_and_role_labels_are_protected(counter: Counter) -> None:
    doc = ("# Release notes\n\n- first item has a lot of detail that can go\n- second item is also long-winded\n\n"
           "User: what changed in this release and why?\nAssistant: many small things were changed here.")
    policy = ProtectionPolicy(markdown=True, role_labels=True)
    result = _compressor(counter, ranker=None, sentence_ranker=None).compress(
        doc, budget=Budget(rate=0.7), protect=policy)
    assert "# Release notes" in result.text
    assert result.text.count("- ") >= 2
    assert "User:" in result.text and "Assistant:" in result.text


def test_empty_tiny_and_already_short_inputs(counter: Counter) -> None:
    compressor = _compressor(counter)
    for docs in ([], [""], ["", ""]):
        result = compressor.compress(docs, question="Why?", budget=Budget(rate=0.5))
        assert result.text == "Why?"
        assert result.num_compressed_tokens == result.num_original_tokens
    tiny = compressor.compress("Hello", budget=Budget(rate=0.5))
    check_result(tiny, ["Hello"], counter)
    roomy = compressor.compress(["a b c", "d e"], question="q?", budget=Budget(target_tokens=500))
    assert roomy.text == "a b c\n\nd e\n\nq?"  # fits already: unchanged, original order
    assert roomy.rate == 1.0


def test_non_ascii_inputs_keep_whole_words(counter: Counter) -> None:
    docs = [
        "東京は日本の首都です。人口はとても多いです。電車は毎日たくさんの人を運びます。" * 3,
        "Les élèves étudient à l'université de Montréal. Ils aiment le café crème et les crêpes." * 3,
        "Привет, мир! Москва — столица России. Зимой там очень холодно и идёт снег." * 3,
    ]
    compressor = _compressor(counter, ranker=None, sentence_ranker=None)
    for rate in (0.3, 0.6):
        result = compressor.compress(docs, budget=Budget(rate=rate))
        check_result(result, docs, counter)
        assert "\ufffd" not in result.text
        for i, doc in enumerate(docs):
            original = set(words_of(doc))
            assert set(words_of(result.contexts[i])) <= original


def test_a_huge_input_is_compressed_to_budget(counter: Counter) -> None:
    data = make_docset(seed=9, num_docs=20, num_filler=6)
    docs = [d * 10 for d in data.docs]  # ~25k tokens
    result = _compressor(counter).compress(docs, question=data.question, budget=Budget(target_tokens=500))
    check_result(result, docs, counter)
    assert result.context_order[0] == data.gold
