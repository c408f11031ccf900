"""The compress hook on the layouts chat apps send, with real clients: the `openai` package through
`terse serve --upstream` (proxy mode) and `wrap_openai`, in front of an upstream that validates
tool-calling conversations the way OpenAI's API does."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from terse.errors import ConfigError
from terse.pipelines import cli_serve
from terse.pipelines.server import ProxyConfig, ServerConfig, ServerThread, proxy_app
from terse.pipelines.server.hooks import build_hook
from terse.pipelines.wrap import last_accounting, wrap_openai
from tests.compress.test_messages_layouts import layouts
from tests.pipelines.chat_upstream import ChatUpstream

LAYOUTS = ("system", "user", "tool", "earlier")


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[ServerThread, ChatUpstream]]:
    recorder = ChatUpstream()
    server = ServerThread(recorder.app).start()
    yield server, recorder
    server.stop()


def start_proxy(url: str, hooks: tuple[Any, ...] = (), tokenizer: str | None = None) -> ServerThread:
    config = ProxyConfig(upstream_url=f"{url}/v1", tokenizer=tokenizer)
    return ServerThread(proxy_app(config, ServerConfig(), hooks)).start()


@pytest.fixture(scope="module")
def proxy(upstream: tuple[ServerThread, ChatUpstream]) -> Iterator[ServerThread]:
    server = start_proxy(upstream[0].url, (build_hook("compress", {"rate": 0.25}),))
    yield server
    server.stop()


def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0, timeout=60)


def check_forwarded(sent: list[dict[str, Any]], forwarded: list[dict[str, Any]], answer: str) -> None:
    """Same roles and fields; only contents changed, shorter, with the answer still in them."""
    assert [m["role"] for m in forwarded] == [m["role"] for m in sent]
    for new, old in zip(forwarded, sent):
        assert new.keys() == old.keys()
        assert all(new[k] == old[k] for k in old if k != "content")
    contents = json.dumps([m.get("content") for m in forwarded], ensure_ascii=False)
    assert len(contents) < 0.5 * len(json.dumps([m.get("content") for m in sent], ensure_ascii=False))
    assert answer in contents
    for m in forwarded:
        if m["role"] == "tool":
            assert isinstance(json.loads(m["content"]), list)  # tool output still parses


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_through_the_proxy(
    layout: str, upstream: tuple[ServerThread, ChatUpstream], proxy: ServerThread
) -> None:
    conversations, question, answer = layouts()
    messages = conversations[layout]
    raw = client(proxy).chat.completions.with_raw_response.create(model="m", messages=messages)  # type: ignore[arg-type]
    reply = raw.parse()
    check_forwarded(messages, upstream[1].bodies[-1]["messages"], answer)
    assert question in json.dumps(upstream[1].bodies[-1]["messages"])
    saved = int(raw.headers["x-terse-saved-prompt-tokens"])
    assert saved > 0 and raw.headers["x-terse-token-count"] == "estimate"
    assert raw.headers["x-terse-compress-budget-count"] == "estimate"
    assert raw.headers["x-terse-compressed-messages"] != "none"
    assert reply.usage is not None and reply.usage.model_extra is not None
    assert reply.usage.model_extra["terse"]["saved_prompt_tokens"] == saved
    assert reply.usage.model_extra["terse"]["compressed_messages"] == raw.headers["x-terse-compressed-messages"]

    streamed = client(proxy).chat.completions.with_raw_response.create(
        model="m", messages=messages, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
    )
    chunks = list(streamed.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Acme Corp"
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra is not None
    assert usage.model_extra["terse"]["saved_prompt_tokens"] == int(streamed.headers["x-terse-saved-prompt-tokens"]) == saved


def test_the_upstream_rejects_a_broken_tool_conversation(upstream: tuple[ServerThread, ChatUpstream], proxy: ServerThread) -> None:
    conversations, _, _ = layouts()
    dangling = [m for m in conversations["tool"] if m["role"] != "assistant"]  # tool message without its call
    with pytest.raises(openai.BadRequestError, match="must answer a preceding tool_calls id"):
        client(proxy).chat.completions.create(model="m", messages=dangling)  # type: ignore[arg-type]
    unanswered = conversations["tool"][:3] + [{"role": "user", "content": "and?"}]
    with pytest.raises(openai.BadRequestError, match="no tool message answering them"):
        client(proxy).chat.completions.create(model="m", messages=unanswered)  # type: ignore[arg-type]


def test_without_hooks_the_proxy_forwards_every_message_field(upstream: tuple[ServerThread, ChatUpstream]) -> None:
    conversations, _, _ = layouts()
    plain = start_proxy(upstream[0].url)
    try:
        for messages in conversations.values():
            client(plain).chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
            assert upstream[1].bodies[-1]["messages"] == messages
    finally:
        plain.stop()


def test_counting_with_the_upstream_tokenizer(upstream: tuple[ServerThread, ChatUpstream], tiny_llama: Path) -> None:
    conversations, _, answer = layouts()
    hook = build_hook("compress", {"rate": 0.25, "tokenizer": str(tiny_llama)})
    exact = start_proxy(upstream[0].url, (hook,), tokenizer=str(tiny_llama))
    try:
        raw = client(exact).chat.completions.with_raw_response.create(model="m", messages=conversations["tool"])  # type: ignore[arg-type]
        assert raw.headers["x-terse-token-count"] == "tokenizer" == raw.headers["x-terse-compress-budget-count"]
        original, sent = int(raw.headers["x-terse-original-prompt-tokens"]), int(raw.headers["x-terse-sent-prompt-tokens"])
        assert sent < 0.45 * original
        check_forwarded(conversations["tool"], upstream[1].bodies[-1]["messages"], answer)
    finally:
        exact.stop()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_through_wrap_openai(layout: str, upstream: tuple[ServerThread, ChatUpstream]) -> None:
    conversations, _, answer = layouts()
    messages = conversations[layout]
    wrapped = wrap_openai(client(upstream[0]), build_hook("compress", {"rate": 0.25}))
    reply = wrapped.chat.completions.create(model="m", messages=messages)
    check_forwarded(messages, upstream[1].bodies[-1]["messages"], answer)
    accounting = last_accounting(reply)
    assert accounting is not None and accounting.saved_prompt_tokens > 0 and accounting.token_count == "estimate"
    stream = wrapped.chat.completions.create(model="m", messages=messages, stream=True, stream_options={"include_usage": True})
    with stream as chunks:
        last = list(chunks)[-1]
    assert last.usage.terse["saved_prompt_tokens"] == accounting.saved_prompt_tokens


def test_wrap_openai_async_tool_conversation(upstream: tuple[ServerThread, ChatUpstream]) -> None:
    conversations, _, answer = layouts()

    async def main() -> Any:
        plain = openai.AsyncOpenAI(api_key="unused", base_url=f"{upstream[0].url}/v1", max_retries=0)
        wrapped = wrap_openai(plain, build_hook("compress", {"rate": 0.25}))
        reply = await wrapped.chat.completions.create(model="m", messages=conversations["tool"])
        await plain.close()
        return reply

    reply = asyncio.run(main())
    assert reply.choices[0].message.content == "Acme Corp"
    check_forwarded(conversations["tool"], upstream[1].bodies[-1]["messages"], answer)


def test_cjk_and_mixed_language_through_the_proxy(upstream: tuple[ServerThread, ChatUpstream], proxy: ServerThread) -> None:
    zh = "王伟于一九五八年在北京创办了长城公司。那一年天气温和，收成很好。当地报纸报道了河上的新桥。" * 3
    mixed = "Li Na founded Dongfang in Shanghai in 1990; 她的爱好是下棋。The market opens at nine every day. " * 3
    filler = "许多游客来参加老城的夏日节日。博物馆开设了一个现代雕塑的新展厅。火车每小时开往海边。" * 3
    question = "问题：王伟哪一年创办了长城公司？"
    messages = [{"role": "user", "content": f"文档：\n[1] {filler}\n\n[2] {zh}\n\n[3] {mixed}\n\n[4] {filler}\n\n{question}"}]
    raw = client(proxy).chat.completions.with_raw_response.create(model="m", messages=messages)  # type: ignore[arg-type]
    forwarded = upstream[1].bodies[-1]["messages"][0]["content"]
    assert raw.status_code == 200 and forwarded.endswith(question) and len(forwarded) < 0.6 * len(messages[0]["content"])
    assert "一九五八" in forwarded  # numerals in the relevant document survive (protected, and on topic)


def test_bad_and_odd_inputs_get_clear_answers(upstream: tuple[ServerThread, ChatUpstream], proxy: ServerThread) -> None:
    conversations, _, _ = layouts()
    url = f"{proxy.url}/v1/chat/completions"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with_image = [{"role": "user", "content": [image, {"type": "text", "text": conversations["user"][1]["content"]}]}]
    ok = httpx.post(url, json={"model": "m", "messages": with_image}, timeout=60)
    assert ok.status_code == 200 and upstream[1].bodies[-1]["messages"] == with_image  # non-text parts: as sent
    text_parts = [{"role": "user", "content": [{"type": "text", "text": conversations["user"][1]["content"]}]}]
    ok = httpx.post(url, json={"model": "m", "messages": text_parts}, timeout=60)
    forwarded = upstream[1].bodies[-1]["messages"][0]["content"]
    assert ok.status_code == 200 and forwarded[0]["type"] == "text" and len(forwarded[0]["text"]) < len(text_parts[0]["content"][0]["text"])
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]
    assert httpx.post(url, json={"model": "m", "messages": empty}, timeout=60).status_code == 200
    for bad, param in (([{"role": "user", "content": 7}], "messages[0].content"), ([{"role": "robot", "content": "x"}], "messages[0].role")):
        answer = httpx.post(url, json={"model": "m", "messages": bad}, timeout=60)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_a_megabyte_message_gets_compressed(upstream: tuple[ServerThread, ChatUpstream]) -> None:
    big = "\n\n".join(f"Note {i}: " + "the quick brown fox jumps over the lazy dog near the river bank. " * 4 for i in range(4000))
    huge = [{"role": "user", "content": f"Notes:\n{big}\n\nQuestion: what does note 7 say?"}]
    assert len(big) > 1_000_000
    fitting = start_proxy(upstream[0].url, (build_hook("compress", {"rate": 0.05}),))
    try:
        ok = httpx.post(f"{fitting.url}/v1/chat/completions", json={"model": "m", "messages": huge}, timeout=120)
        forwarded = upstream[1].bodies[-1]["messages"][0]["content"]
        assert ok.status_code == 200 and len(forwarded) < 0.07 * len(big) and forwarded.endswith("what does note 7 say?")
    finally:
        fitting.stop()


def test_verbatim_text_over_a_target_is_forwarded_as_sent_and_said(upstream: tuple[ServerThread, ChatUpstream]) -> None:
    conversations, _, _ = layouts()
    tight = start_proxy(upstream[0].url, (build_hook("compress", {"target": 5}),))
    try:
        raw = client(tight).chat.completions.with_raw_response.create(model="m", messages=conversations["user"])  # type: ignore[arg-type]
        assert raw.headers["x-terse-compress-skipped"] == "verbatim-over-budget"
        assert raw.headers["x-terse-saved-prompt-tokens"] == "0"
        assert upstream[1].bodies[-1]["messages"] == conversations["user"]
    finally:
        tight.stop()


def test_serve_flags_build_a_scorer_free_hook() -> None:
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    args = parser.parse_args(["--upstream", "http://127.0.0.1:1/v1", "--compress", "--compress-target", "300"])
    (hook,) = cli_serve._hooks(args, None)
    assert hook.compressor.scorer is None and hook.policy.budget.target_tokens == 300 and hook.budget_count == "estimate"
    assert hook.policy.protect.numbers and hook.policy.protect.code_blocks and not hook.policy.protect.markdown
    with pytest.raises(SystemExit):
        parser.parse_args(["--upstream", "http://x/v1", "--compress", "--compress-rate", "0.5", "--compress-target", "9"])
    args = parser.parse_args(["--upstream", "http://x/v1", "--compress", "--compress-protect", "numbers,typo"])
    with pytest.raises(ConfigError, match="typo"):
        cli_serve._hooks(args, None)
    with pytest.raises(ConfigError, match="rate"):
        build_hook("compress", {"rate": 0.5, "target": 10})


TOOL_AWARE_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }} {{ c.function.arguments }}</call>"
    "{% endfor %}{% endif %}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tool_calls_text(message: dict[str, Any]) -> str:
    """The assistant's tool calls as terse's engine writes them for a template that cannot."""
    calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
             for c in message.get("tool_calls") or []]
    return "\n".join(f"<tool_call>{json.dumps(call)}</tool_call>" for call in calls)


@pytest.mark.parametrize("template", ["plain", "tool-aware"])
def test_accounting_counts_the_tool_calls_sent_upstream(
    template: str, upstream: tuple[ServerThread, ChatUpstream], tiny_llama: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer_dir = tiny_llama
    if template == "tool-aware":
        tok = AutoTokenizer.from_pretrained(tiny_llama)
        tok.chat_template = TOOL_AWARE_TEMPLATE
        tok.save_pretrained(tmp_path)
        tokenizer_dir = tmp_path
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def count(messages: list[dict[str, Any]], with_calls: bool = True) -> int:
        """The prompt as the upstream's model reads it, counted here independently of the proxy."""
        shown = []
        for m in messages:
            content = m.get("content") or ""
            calls = _tool_calls_text(m) if with_calls else ""
            if template == "plain" or not with_calls:
                shown.append({"role": m["role"], "content": f"{content}\n{calls}" if content and calls else content + calls})
            else:
                shown.append({**m, "content": content})
        text = tok.apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    conversations, _, answer = layouts()
    messages = conversations["tool"]
    assert any(m.get("tool_calls") for m in messages)
    hook = build_hook("compress", {"rate": 0.25, "tokenizer": str(tokenizer_dir)})
    exact = start_proxy(upstream[0].url, (hook,), tokenizer=str(tokenizer_dir))
    try:
        raw = client(exact).chat.completions.with_raw_response.create(model="m", messages=messages)  # type: ignore[arg-type]
        forwarded = upstream[1].bodies[-1]["messages"]
        check_forwarded(messages, forwarded, answer)
        original = int(raw.headers["x-terse-original-prompt-tokens"])
        sent = int(raw.headers["x-terse-sent-prompt-tokens"])
        assert raw.headers["x-terse-token-count"] == "tokenizer"
        assert (original, sent) == (count(messages), count(forwarded))
        assert original > count(messages, with_calls=False)  # the tool calls are in the count
        assert sent > count(forwarded, with_calls=False)
        usage = raw.parse().usage
        assert usage is not None and usage.model_extra is not None
        terse_usage = usage.model_extra["terse"]
        assert (terse_usage["original_prompt_tokens"], terse_usage["sent_prompt_tokens"]) == (original, sent)
        assert terse_usage["saved_prompt_tokens"] == int(raw.headers["x-terse-saved-prompt-tokens"]) == original - sent

        streamed = client(exact).chat.completions.with_raw_response.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
        )
        last = list(streamed.parse())[-1].usage
        assert last is not None and last.model_extra is not None
        assert int(streamed.headers["x-terse-original-prompt-tokens"]) == original
        assert int(streamed.headers["x-terse-sent-prompt-tokens"]) == sent
        assert (last.model_extra["terse"]["original_prompt_tokens"], last.model_extra["terse"]["sent_prompt_tokens"]) == (
            original, sent)
    finally:
        exact.stop()


def test_wrap_openai_counts_the_messages_as_sent(upstream: tuple[ServerThread, ChatUpstream]) -> None:
    conversations, _, _ = layouts()
    seen: list[list[dict[str, Any]]] = []

    def count(messages: Any) -> int:
        seen.append([dict(m) for m in messages])
        return sum(len(m["content"]) for m in messages) + sum(len(json.dumps(m.get("tool_calls") or [])) for m in messages)

    wrapped = wrap_openai(client(upstream[0]), build_hook("compress", {"rate": 0.25}), count_prompt_tokens=count)
    reply = wrapped.chat.completions.create(model="m", messages=conversations["tool"])
    accounting = last_accounting(reply)
    assert accounting is not None
    original, sent = seen
    assert [m.get("tool_calls") for m in original] == [m.get("tool_calls") for m in conversations["tool"]]
    assert [m.get("tool_calls") for m in sent] == [m.get("tool_calls") for m in upstream[1].bodies[-1]["messages"]]
    assert all(isinstance(m["content"], str) for m in original)  # null content counted as ""
    assert accounting.original_prompt_tokens == count(original) and accounting.sent_prompt_tokens == count(sent)
