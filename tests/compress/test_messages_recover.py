"""compress_messages (per-role policy) and recover (quoted compressed spans back to the original)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from terse.backend.types import Message
from terse.compress import (
    Budget,
    CompressorConfig,
    MessagePolicy,
    PromptCompressor,
    ProtectionPolicy,
    compress_messages,
    recover,
)
from terse.errors import ConfigError, InvalidRequestError
from tests.compress.checks import is_subsequence, words_of
from tests.compress.corpus import make_docset

Counter = Callable[[str], int]


def _conversation() -> tuple[list[Message], str]:
    data = make_docset(seed=11, num_docs=4, num_filler=4)
    messages: list[Message] = [{"role": "system", "content": "You are a careful assistant. Cite the documents."}]
    for doc in data.docs:
        messages.append({"role": "user", "content": f"Here is a document: {doc}"})
        messages.append({"role": "assistant", "content": "Noted. I have read the document carefully and will use it."})
    messages.append({"role": "user", "content": data.question})
    return messages, data.answer


def test_messages_keep_system_and_last_user_and_meet_the_budget(counter: Counter) -> None:
    messages, answer = _conversation()
    compressor = PromptCompressor(None, counter, CompressorConfig(ranker="bm25", token_pruner=None))
    policy = MessagePolicy(Budget(target_tokens=150), protect=ProtectionPolicy(literals=("Cite",)))
    out, result, report = compress_messages(compressor, messages, policy)
    assert result is not None
    assert out[0] == messages[0] and out[-1] == messages[-1]  # short instruction, the question: verbatim
    assert sum(counter(m["content"]) for m in out) <= 150
    assert [m["role"] for m in out] == [m["role"] for m in messages]  # no turn disappears
    # every turn's content is whole words of its own original, in order (or the placeholder)
    for m, o in zip(out, messages):
        assert m["content"] == policy.placeholder or is_subsequence(words_of(m["content"]), words_of(o["content"]))
    assert answer in " ".join(m["content"] for m in out)  # the relevant turn survives
    assert messages[1]["content"].startswith("Here is a document")  # input not mutated
    assert report.compressed and not report.unrecognised
    assert {r.outcome for r in report.messages} == {"short", "documents"}


def test_messages_policy_edges(counter: Counter) -> None:
    messages, _ = _conversation()
    compressor = PromptCompressor(None, counter, CompressorConfig(ranker="bm25", token_pruner=None))
    out, result, _ = compress_messages(compressor, messages, MessagePolicy(Budget(target_tokens=100_000)))
    assert out == messages
    with pytest.raises(InvalidRequestError, match="verbatim text"):
        compress_messages(compressor, messages, MessagePolicy(Budget(target_tokens=20), keep_last_messages=3))
    with pytest.raises(InvalidRequestError, match="messages\\[0\\]"):
        compress_messages(compressor, [{"role": "boss", "content": "x"}], MessagePolicy(Budget(rate=0.5)))  # type: ignore[list-item]
    out, result, _ = compress_messages(
        compressor, messages, MessagePolicy(Budget(rate=0.3), keep_roles=("system", "assistant"))
    )
    assert [m for m in out if m["role"] == "assistant"] == [m for m in messages if m["role"] == "assistant"]


def test_recover_expands_quoted_compressed_spans(counter: Counter) -> None:
    original = "Alice moved to Paris in 2019 and she works at the Acme Corp head office near the river."
    compressed = "Alice moved Paris 2019 works Acme Corp office river."
    response = "According to the text, Alice moved Paris 2019. Her employer: Acme Corp office."
    assert recover(original, compressed, response) == (
        "According to the text, Alice moved to Paris in 2019. Her employer: Acme Corp head office."
    )
    assert recover(original, compressed, "Nothing quoted here.") == "Nothing quoted here."
    assert recover(original, compressed, "Alice said hi") == "Alice said hi"  # a lone word is not a quote
    assert recover(original, compressed, "Alice moved", min_run=2) == "Alice moved"


def test_recover_on_a_real_compression(counter: Counter) -> None:
    data = make_docset(seed=2, num_docs=1, num_filler=4)
    compressor = PromptCompressor(None, counter, CompressorConfig(ranker=None, sentence_ranker=None, token_pruner=None))
    result = compressor.compress(data.docs[0], budget=Budget(rate=0.5))
    quoted = " ".join(words_of(result.text)[:6])
    recovered = recover(data.docs[0], result.text, f"It says: {quoted}")
    assert recovered.startswith("It says: ")
    assert data.docs[0].startswith(recovered[len("It says: "):])


def test_recover_picks_the_occurrence_the_compressed_word_came_from() -> None:
    original = "the cat sat on the mat and the dog"
    assert recover(original, "the mat dog", "It was the mat.") == "It was the mat."
    assert recover(original, "cat the mat", "So: cat the mat") == "So: cat sat on the mat"


def test_recover_maps_each_span_to_its_own_context_in_rank_order(counter: Counter) -> None:
    docs = ["Nora lives in Oslo and works at Globex as an engineer since 2001. Nora likes chess.",
            "Omar lives in Lima and works at Hooli as an engineer since 1999. Omar likes sailing.",
            "The weather was mild. The harvest was good. Many visitors came for the festival."]
    compressor = PromptCompressor(None, counter, CompressorConfig(token_pruner=None))
    result = compressor.compress(docs, question="Where does Omar work?", budget=Budget(rate=0.6))
    assert result.context_order[0] == 1  # ranked first: output order differs from input order
    omar = result.contexts[1]
    quoted = " ".join(words_of(omar)[:6])
    recovered = recover(docs, result, f"Answer: {quoted}")
    assert recovered.startswith("Answer: ")
    assert docs[1].startswith(recovered[len("Answer: "):])  # expanded from Omar's document, not Nora's
    # words shared by both documents ("lives in", "works at", "engineer since") map to the right one
    tail = " ".join(words_of(omar)[-4:])
    assert recover(docs, result, tail) in docs[1]
    with pytest.raises(ConfigError, match="CompressionResult"):
        recover(docs, result.text, "x")
