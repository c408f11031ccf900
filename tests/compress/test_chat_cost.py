"""What a chat compression costs when a hook keeps its caches: tokenizer calls pinned per request, the
caches bounded by size, and the word-wise estimate used without the model's tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from terse.compress import Budget, CompressorConfig, MessagePolicy, PromptCompressor, compress_messages
from terse.compress.analysis import AnalysisCache
from terse.compress.layout_cache import LayoutCache
from terse.compress.layouts import parse_layout
from terse.compress.tokenizer import (
    CharEstimateTarget,
    CounterTarget,
    FastTokenizerTarget,
    load_target_tokenizer,
    target_tokenizer_of,
)
from terse.errors import ConfigError
from tests.compress.test_messages_layouts import layouts
from tests.compress.test_overhead import CountingTarget

FREE = CompressorConfig(token_pruner=None)


@pytest.fixture()
def counting(tiny_llama: Path) -> CountingTarget:
    from transformers import AutoTokenizer

    return CountingTarget(AutoTokenizer.from_pretrained(tiny_llama))


def compressor_over(target: Any, max_chars: int | None = None) -> PromptCompressor:
    compressor = PromptCompressor(None, config=FREE, analyses=AnalysisCache(target, max_chars=max_chars))
    compressor.compress(["warm up the constants."], budget=Budget(rate=0.5), question="q?")  # separators counted
    return compressor


@pytest.mark.parametrize("layout", ["system", "user", "tool", "earlier"])
def test_tokenizer_calls_per_chat_request_are_pinned(counting: CountingTarget, layout: str) -> None:
    messages, _, _ = layouts()
    conversation = messages[layout]
    compressor, cache = compressor_over(counting), LayoutCache()
    policy = MessagePolicy(budget=Budget(rate=0.25))
    counting.num_calls = 0
    first = compress_messages(compressor, conversation, policy, layouts=cache)
    assert first.result is not None
    num_docs = len(first.result.contexts)
    # each new document: one tokenization with offsets and one batched edge check; one verifying count
    # of the fitted documents. A short instruction or question is told by its length alone; a short
    # earlier turn (the assistant's reply), which could be material, is counted once to tell
    num_short_turns = 1 if layout == "earlier" else 0
    assert counting.num_calls == 2 * num_docs + 1 + num_short_turns
    counting.num_calls = 0
    again = compress_messages(compressor, conversation, policy, layouts=cache)
    assert counting.num_calls == 1  # the conversation recurs: only the verifying count
    assert again.messages == first.messages
    assert len(cache) == sum(1 for m in conversation if isinstance(m.get("content"), str))


@pytest.mark.parametrize("layout", ["system", "user", "tool", "earlier"])
def test_a_target_budget_counts_the_verbatim_text_once(counting: CountingTarget, layout: str) -> None:
    conversation = layouts()[0][layout]
    compressor = compressor_over(counting)
    policy = MessagePolicy(budget=Budget(target_tokens=200))
    first = compress_messages(compressor, conversation, policy)
    counting.num_calls = 0
    again = compress_messages(compressor, conversation, policy)
    # the verbatim parts come from the cache; each fit attempt (at most 3) costs one verifying count of
    # the documents and one batched count of the rewritten messages
    assert counting.num_calls in (2, 4, 6)
    assert again.messages == first.messages
    assert sum(counting.count(m["content"]) for m in again.messages if isinstance(m.get("content"), str)) <= 200


def test_analysis_cache_is_bounded_by_characters(counting: CountingTarget) -> None:
    texts = [f"Text number {i} says that Alpha works at Beta since {1900 + i}. " * 4 for i in range(6)]
    cache = AnalysisCache(counting, max_chars=2 * len(texts[0]) + 10)
    for text in texts:
        cache.get(text)
        assert cache.num_chars <= cache.max_chars  # type: ignore[operator]
    assert len(cache) == 2
    counting.num_calls = 0
    cache.get(texts[-1])  # the latest ones stay
    assert counting.num_calls == 0
    cache.get(texts[0])  # the oldest went
    assert counting.num_calls == 1
    # counted texts share the bound and go first
    assert cache.count("a short one") == counting.count("a short one")
    assert cache.num_chars <= cache.max_chars  # type: ignore[operator]
    tiny = AnalysisCache(counting, max_chars=0)
    tiny.get(texts[0])
    tiny.get(texts[1])
    assert len(tiny) == 1 and tiny.count(texts[2]) == counting.count(texts[2])
    tiny.clear()
    assert len(tiny) == 0 and tiny.num_chars == 0
    with pytest.raises(ConfigError, match="max_chars=-1"):
        AnalysisCache(counting, max_chars=-1)


def test_layout_cache_returns_the_parsed_layout_and_is_bounded() -> None:
    messages, _, _ = layouts()
    texts = [m["content"] for conv in messages.values() for m in conv if isinstance(m.get("content"), str)]
    cache = LayoutCache(max_chars=max(map(len, texts)) + 1)
    for text in texts:
        for whole in (False, True):
            got = cache.parse(text, whole_fallback=whole, min_passage_chars=150)
            assert got == parse_layout(text, whole_fallback=whole, min_passage_chars=150)
            assert cache.parse(text, whole_fallback=whole, min_passage_chars=150) is got
            assert cache.num_chars <= cache.max_chars
    assert len(cache) < 2 * len(texts)  # the oldest went
    with pytest.raises(ConfigError, match="max_entries=0"):
        LayoutCache(max_entries=0)


def test_char_estimate_counts_words_by_characters() -> None:
    estimate = CharEstimateTarget()
    assert estimate.count("") == 0
    assert estimate.count("a bb ccc dddd") == 4  # every word at least one token
    assert estimate.count("internationalisation") == 5  # ceil(20 / 4)
    assert estimate.count("北京大学") >= 2  # wide characters: one token each
    text = "Lirois was founded in 1958.\n\nIt is a town."
    spans = estimate.spans(text)
    assert len(spans) == estimate.count(text) and all(0 <= a < b <= len(text) for a, b in spans)
    assert not any(text[a:b].isspace() for a, b in spans)  # whitespace costs nothing
    assert estimate.count_many(["a b", "ccccc"]) == [2, 2]
    assert target_tokenizer_of(estimate) is estimate
    with pytest.raises(ConfigError, match="chars_per_token=0"):
        CharEstimateTarget(0)


def test_compression_under_the_estimate_meets_the_estimated_budget() -> None:
    messages, _, _ = layouts()
    compressor = PromptCompressor(None, CharEstimateTarget(), FREE)
    result = compress_messages(compressor, messages["system"], MessagePolicy(budget=Budget(rate=0.3))).result
    assert result is not None and 0 < result.num_compressed_tokens <= result.target_tokens


def test_a_named_tokenizer_gives_offsets_only_when_its_counts_agree(tiny_llama: Path, monkeypatch: Any) -> None:
    assert isinstance(load_target_tokenizer(str(tiny_llama)), FastTokenizerTarget)
    # an encoder that counts unlike the transformers tokenizer (Python-side normalisation): not trusted
    monkeypatch.setattr(FastTokenizerTarget, "count", lambda self, text: 1 + len(self.spans(text)))
    fallback = load_target_tokenizer(str(tiny_llama))
    assert isinstance(fallback, CounterTarget) and fallback.spans("some text") is None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert fallback.count("some text") == len(tokenizer("some text", add_special_tokens=False)["input_ids"])
