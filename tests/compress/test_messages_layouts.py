"""`compress_messages` on the layouts chat apps send: documents found and compressed in place, the
conversation (roles, fields, tool-call pairing, JSON, content parts) kept intact."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from terse.compress import (
    Budget,
    CompressorConfig,
    MessagePolicy,
    PromptCompressor,
    ProtectionPolicy,
    compress_messages,
)
from tests.compress.checks import is_subsequence, words_of
from tests.compress.corpus import make_docset

Counter = Callable[[str], int]
SYSTEM = "Answer the question using only the documents. Reply with the answer only."
TOOL_CALL = {"id": "call_7", "type": "function", "function": {"name": "search", "arguments": '{"query": "q"}'}}


def layouts(seed: int = 5) -> tuple[dict[str, list[dict[str, Any]]], str, str]:
    """The four layouts of one question over the same documents, and the question and answer."""
    data = make_docset(seed=seed, num_docs=8, num_filler=4)
    tagged = "\n".join(f'<document id="d{i}">\n{d}\n</document>' for i, d in enumerate(data.docs))
    numbered = "\n\n".join(f"[{i + 1}] {d}" for i, d in enumerate(data.docs))
    results = json.dumps([{"id": f"d{i}", "title": f"Profile {i}", "text": d} for i, d in enumerate(data.docs)], indent=1)
    headed = "\n\n".join(f"## Profile {i}\n{d}" for i, d in enumerate(data.docs))
    return {
        "system": [
            {"role": "system", "content": f"{SYSTEM}\n\n<documents>\n{tagged}\n</documents>"},
            {"role": "user", "content": data.question, "name": "alice"},
        ],
        "user": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Context:\n{numbered}\n\nQuestion: {data.question}"},
        ],
        "tool": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": data.question},
            {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL], "x-trace": {"span": 3}},
            {"role": "tool", "tool_call_id": "call_7", "name": "search", "content": results},
        ],
        "earlier": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Here are the profiles.\n\n{headed}"},
            {"role": "assistant", "content": "Thanks, I have read them."},
            {"role": "user", "content": data.question},
        ],
    }, data.question, data.answer


def scorer_free(counter: Counter) -> PromptCompressor:
    return PromptCompressor(None, counter, CompressorConfig(token_pruner=None))


def content_tokens(messages: list[dict[str, Any]], counter: Counter) -> int:
    return sum(counter(m["content"]) for m in messages if isinstance(m.get("content"), str))


@pytest.mark.parametrize("layout", ["system", "user", "tool", "earlier"])
def test_each_layout_saves_tokens_keeps_the_answer_and_the_conversation(layout: str, counter: Counter) -> None:
    conversations, question, answer = layouts()
    messages = conversations[layout]
    before = copy.deepcopy(messages)
    out, result, report = compress_messages(scorer_free(counter), messages, MessagePolicy(Budget(rate=0.25)))
    assert messages == before  # the input is not mutated
    assert result is not None and report.compressed
    assert content_tokens(out, counter) < 0.45 * content_tokens(messages, counter)
    assert answer in json.dumps([m.get("content") for m in out], ensure_ascii=False)
    assert [m["role"] for m in out] == [m["role"] for m in messages]
    for new, old in zip(out, messages):
        # every field but content is the very same object (tool_calls, tool_call_id, name, unknown keys)
        assert new.keys() == old.keys()
        assert all(new[k] is old[k] for k in old if k != "content")
    # instructions and the question stay verbatim
    assert question in json.dumps([m.get("content") for m in out])
    assert SYSTEM in out[0]["content"]
    if layout == "tool":
        kept = json.loads(out[3]["content"])  # still JSON, fewer and shorter documents
        assert kept and all(set(item) == {"id", "title", "text"} for item in kept)
        assert len(kept) <= len(json.loads(messages[3]["content"]))


def test_a_target_budget_counts_every_content_token(counter: Counter) -> None:
    conversations, _, answer = layouts(seed=9)
    for messages in conversations.values():
        out, _, _ = compress_messages(scorer_free(counter), messages, MessagePolicy(Budget(target_tokens=260)))
        assert content_tokens(out, counter) <= 260


def test_content_parts_compress_text_and_keep_other_parts(counter: Counter) -> None:
    conversations, _, answer = layouts()
    text = conversations["user"][1]["content"]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": [image, {"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]},
    ]
    out, result, _ = compress_messages(scorer_free(counter), messages, MessagePolicy(Budget(rate=0.25)))
    assert result is not None
    parts = out[1]["content"]
    assert parts[0] is image and parts[1]["cache_control"] == {"type": "ephemeral"}
    assert counter(parts[1]["text"]) < 0.5 * counter(text) and answer in parts[1]["text"]
    assert out[0]["content"] == messages[0]["content"]


def test_a_turn_dropped_whole_keeps_a_placeholder(counter: Counter) -> None:
    data = make_docset(seed=3, num_docs=6, num_filler=4)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for doc in data.docs:
        messages += [{"role": "user", "content": doc}, {"role": "assistant", "content": "Noted."}]
    messages.append({"role": "user", "content": data.question})
    out, _, report = compress_messages(scorer_free(counter), messages, MessagePolicy(Budget(rate=0.15)))
    assert [m["role"] for m in out] == [m["role"] for m in messages]
    assert any(m["content"] == "[omitted]" for m in out)  # a dropped document's turn stays, as a placeholder
    assert data.answer in " ".join(m["content"] for m in out)
    assert {r.layout for r in report.messages if r.num_documents} == {"whole"}


def test_empty_none_and_short_contents_pass_and_unrecognised_ones_are_reported(counter: Counter) -> None:
    instructions = "You are the billing assistant of Acme and you answer in English, politely and briefly. " * 4
    conversations, _, _ = layouts()
    messages = [
        {"role": "system", "content": instructions},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_7", "content": []},
        *conversations["user"][1:],
    ]
    out, result, report = compress_messages(scorer_free(counter), messages, MessagePolicy(Budget(rate=0.3)))
    assert result is not None and out[:4] == messages[:4]
    assert [r.outcome for r in report.messages] == ["unrecognised", "short", "no_text", "no_text", "documents"]
    assert report.unrecognised == (0,) and report.compressed == (4,)


def test_cjk_and_mixed_language_documents_compress_in_place(counter: Counter) -> None:
    zh = [
        f"{name}于一九五八年在{city}创办了{company}公司。那一年天气温和，收成很好。当地报纸报道了河上的新桥。"
        f"许多游客来参加老城的夏日节日。博物馆开设了一个现代雕塑的新展厅。"
        for name, city, company in (("王伟", "北京", "长城"), ("李娜", "上海", "东方"), ("张敏", "广州", "南方"))
    ]
    mixed = "Nils Giroani works at Vasoora Works in Kelmar; 他的爱好是下棋。The market opens at nine every day. " * 3
    numbered = "\n\n".join(f"[{i + 1}] {d}" for i, d in enumerate([*zh, mixed]))
    messages = [{"role": "user", "content": f"文档：\n{numbered}\n\n问题：李娜创办了哪家公司？"}]
    out, result, report = compress_messages(
        scorer_free(counter), messages, MessagePolicy(Budget(rate=0.4), protect=ProtectionPolicy(numbers=True))
    )
    assert result is not None and report.messages[0].layout == "numbered"
    text = out[0]["content"]
    assert text.endswith("问题：李娜创办了哪家公司？") and counter(text) < counter(messages[0]["content"])
    for compressed, original in zip(result.contexts, [*zh, mixed]):
        assert is_subsequence(words_of(compressed), words_of(original))
