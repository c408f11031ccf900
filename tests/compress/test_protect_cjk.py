"""Keeping the answer: protection detectors, structural spans kept whole, CJK compressed by words."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from terse.compress import Budget, CompressorConfig, PromptCompressor, ProtectionPolicy
from terse.compress.protect import structural_spans
from terse.compress.words import split_words
from tests.compress.checks import check_result

Counter = Callable[[str], int]
FREE = CompressorConfig(token_pruner=None)


def _found(text: str, **flags: bool) -> list[str]:
    return [text[a:b] for a, b in sorted(structural_spans(text, ProtectionPolicy(**flags)))]


def test_detectors_find_the_facts_answers_are_made_of() -> None:
    text = ("Mail ops@example.co.uk or visit https://example.com/docs?id=7, before May 5, 2024 or "
            "5 March 2020; 北京大学成立于一九五八年，有一千五百万人，2019年5月1日开放。Price $1,299.50.")
    assert _found(text, emails=True) == ["ops@example.co.uk"]
    assert _found(text, urls=True) == ["https://example.com/docs?id=7"]
    assert _found(text, dates=True) == ["May 5, 2024", "5 March 2020"]
    numbers = _found(text, numbers=True)
    for fact in ("一九五八年", "一千五百万", "2019年", "$1,299.50"):
        assert any(fact in found for found in numbers), (fact, numbers)
    assert _found("plain words only", **{f: True for f in ("numbers", "dates", "urls", "emails")}) == []


_RELEASE_NOTES = ["Release notes: `make install --prefix=/opt/app` then `make test` and then `make bench` again.",
                  "Unrelated filler about weather and trains and libraries and festivals in town."]
_CODE_SPANS = ("`make install --prefix=/opt/app`", "`make test`", "`make bench`")


def _keeping_every_span(fast_target: object, policy: ProtectionPolicy) -> PromptCompressor:
    """A compressor in reading order (no rankers) that keeps every code span under an ample budget."""
    compressor = PromptCompressor(None, fast_target, CompressorConfig(ranker=None, sentence_ranker=None,
                                                                      token_pruner=None))
    everything = compressor.compress(_RELEASE_NOTES, budget=Budget(target_tokens=10_000), protect=policy)
    assert all(s in everything.text for s in _CODE_SPANS)
    return compressor


def test_structural_spans_that_do_not_fit_are_kept_whole_best_first(fast_target: object) -> None:
    policy = ProtectionPolicy(code_blocks=True)
    compressor = _keeping_every_span(fast_target, policy)
    docs, spans = _RELEASE_NOTES, _CODE_SPANS
    # the spans alone need more than this: no error, and each one is kept whole or not at all
    budget = fast_target.count(spans[0]) + 2  # type: ignore[attr-defined]
    result = compressor.compress(docs, budget=Budget(target_tokens=budget), protect=policy)
    check_result(result, docs, fast_target.count, slack=None)  # type: ignore[attr-defined]
    kept = result.text
    assert spans[0] in kept  # reading order within the context: the first span fits whole
    assert "--prefix=/opt/app`" not in kept.replace(spans[0], "")
    assert ("make bench" in kept) == (spans[2] in kept) and ("`make test`" in kept) == (spans[1] in kept)


def test_spans_ranked_with_their_context_that_do_not_fit_are_dropped_whole(fast_target: object) -> None:
    policy = ProtectionPolicy(code_blocks=True, rank_with_context=True)
    compressor = _keeping_every_span(fast_target, policy)
    docs, spans = _RELEASE_NOTES, _CODE_SPANS
    # spans rank with their context (here: reading order); one that does not fit whole is dropped whole
    budget = fast_target.count(spans[0]) + 2  # type: ignore[attr-defined]
    for target in range(budget - 8, budget + 12):
        result = compressor.compress(docs, budget=Budget(target_tokens=target), protect=policy)
        check_result(result, docs, fast_target.count, slack=None)  # type: ignore[attr-defined]
        kept = result.text
        assert kept.startswith("Release")  # the words before the first span come first
        assert ("--prefix" in kept or "install" in kept) == (spans[0] in kept)
        assert ("make bench" in kept) == (spans[2] in kept) and ("`make test`" in kept) == (spans[1] in kept)


def test_user_literals_stay_mandatory(counter: Counter) -> None:
    compressor = PromptCompressor(None, counter, FREE)
    with pytest.raises(Exception, match="protected spans alone"):
        compressor.compress(["keep ORDER-7731 " * 40], budget=Budget(target_tokens=5),
                            protect=ProtectionPolicy(literals=("ORDER-7731",)))


@pytest.mark.parametrize("text, question, facts", [
    ("北京大学成立于一九五八年，有一千五百万人在北京生活。天气很好，很多游客来参观博物馆和公园。"
     "火车每小时一班，车站很新。", "北京大学哪年成立？", ("一九五八年", "北京大学")),
    ("東京大学は一九五八年に設立された。天気はとても良く、多くの観光客が博物館を訪れる。"
     "電車は毎時間走っている。", "東京大学はいつ設立されましたか？", ("一九五八年", "東京大学")),
])
def test_cjk_is_compressed_by_whole_words(counter: Counter, text: str, question: str,
                                          facts: tuple[str, ...]) -> None:
    compressor = PromptCompressor(None, counter, FREE)
    result = compressor.compress(text, question=question, budget=Budget(rate=0.5),
                                 protect=ProtectionPolicy.standard())
    check_result(result, [text], counter, slack=None)  # byte-level BPE merges inside CJK: fit measured
    assert result.num_compressed_tokens < result.num_original_tokens
    words = {text[a:b] for a, b in split_words(text)}
    kept = result.contexts[0]
    assert {kept[a:b] for a, b in split_words(kept)} <= words  # whole segmenter words only
    for fact in facts:
        assert fact in kept
    assert "北" not in words and "京" not in words  # 北京 is never split into characters
