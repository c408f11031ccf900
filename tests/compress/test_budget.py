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


def test_literals_are_always_present_and_structural_spans_whole_or_absent(counter: Counter) -> None:
    docs = [
        "Order ORDER-7731 shipped on 2026-11-21 for $1,234.50 to Acme Corp. The parcel was small and brown.\n"
        "```python\ndef total(xs):\n    return sum(xs)\n```\nThe end of the note, with many more words after it.",
        'Data: {"user_id": 42, "plan": "pro"} and a long sentence that nobody needs at all in the result.',
    ]
    policy = ProtectionPolicy(literals=("Acme Corp",), patterns=(r"ORDER-\d+",), numbers=True, code_blocks=True,
                              json_keys=True)
    code = "```python\ndef total(xs):\n    return sum(xs)\n```"
    compressor = _compressor(counter, ranker=None, sentence_ranker=None)
    seen_without_code = False
    for rate in (0.3, 0.45, 0.6, 0.8, 1.0):
        result = compressor.compress(docs, budget=Budget(rate=rate), protect=policy)
        check_result(result, docs, counter, slack=None)
        assert "ORDER-7731" in result.text and "Acme Corp" in result.text  # the user's: mandatory
        # a structural span is atomic: any piece of the code block present means all of it is
        pieces = ("```python", "def total(xs):", "return sum(xs)")
        if any(p in result.text for p in pieces):
            assert code in result.text, (rate, result.text)
        else:
            seen_without_code = True
        if rate == 1.0:
            for span in ("2026-11-21", "$1,234.50", '"user_id":', '"plan":', "42", code):
                assert span in result.text, span
    assert seen_without_code  # low rates drop it whole: it ranks with its context, not ahead of it
    with pytest.raises(InvalidRequestError, match="protected spans alone"):
        compressor.compress(docs, budget=Budget(target_tokens=10), protect=policy)


def test_a_structural_span_goes_with_the_sentence_the_budget_cuts(counter: Counter) -> None:
    # no rankers: the keep order is the text's own order, so the fit keeps a prefix of the document
    doc = ("The museum opened its new wing to visitors after a long and careful restoration of the old halls. "
           "About 22939 people work in its medicine divisions across the region today.")
    compressor = _compressor(counter, ranker=None, sentence_ranker=None)
    with_context = ProtectionPolicy(numbers=True, rank_with_context=True)
    result = compressor.compress(doc, budget=Budget(rate=0.5), protect=with_context)
    check_result(result, [doc], counter, slack=None)
    assert "22939" not in result.text  # not kept alone, ahead of the words around it
    assert result.text.startswith("The museum opened its new wing")
    first = compressor.compress(doc, budget=Budget(rate=0.5), protect=ProtectionPolicy(numbers=True))
    check_result(first, [doc], counter, slack=None)
    assert first.text.startswith("The museum opened") and first.text.endswith(" 22939")  # by default: kept first
    literal = compressor.compress(doc, budget=Budget(rate=0.5), protect=ProtectionPolicy(literals=("22939",)))
    assert "22939" in literal.text  # a literal the user gave is kept whatever its sentence


def test_user_literals_are_kept_even_in_dropped_contexts(counter: Counter) -> None:
    data = make_docset(seed=1, num_docs=8)
    docs = list(data.docs)
    docs[(data.gold + 1) % len(docs)] += " The code word is ZEBRA-99."
    policy = ProtectionPolicy(literals=("ZEBRA-99",))
    result = _compressor(counter).compress(docs, question=data.question, budget=Budget(rate=0.15), protect=policy)
    assert "ZEBRA-99" in result.text
    check_result(result, docs, counter, slack=None)


def test_markdown_headings_and_role_labels_are_kept_whole(counter: Counter) -> None:
    doc = ("# Release notes\n\n- first item has a lot of detail that can go\n- second item is also long-winded\n\n"
           "User: what changed in this release and why?\nAssistant: many small things were changed here.")
    policy = ProtectionPolicy(markdown=True, role_labels=True)
    compressor = _compressor(counter, ranker=None, sentence_ranker=None)
    for rate in (0.05, 0.1, 0.2, 0.4, 0.7):
        result = compressor.compress(doc, budget=Budget(rate=rate), protect=policy)
        check_result(result, [doc], counter, slack=None)
        assert ("Release" in result.text) == ("# Release notes" in result.text)  # a heading line is one unit
    # reading order: the heading and the bullets come before the cut at 0.7
    assert "# Release notes" in result.text and result.text.count("- ") >= 2 and "User:" in result.text
    everything = compressor.compress(doc, budget=Budget(rate=1.0), protect=policy)
    assert "User:" in everything.text and "Assistant:" in everything.text


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
