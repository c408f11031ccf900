"""The compression and retrieval hooks on the chat path of `terse serve` (engine mode, tiny model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from terse.backend import load_backend
from terse.compress import ProtectionPolicy
from terse.compress.tokenizer import CharEstimateTarget, FastTokenizerTarget
from terse.errors import ConfigError
from terse.pipelines.server import ServerConfig, ServerThread, engine_app
from terse.pipelines.server.hooks import build_hook
from terse.pipelines.server.layer_hooks import CompressHook, protection
from terse.pipelines.server.schema import parse_chat
from tests.pipelines.test_server import MODEL, RecordingBackend

HISTORY = " ".join(
    f"Note {i}: Alice works at Acme Corp in Paris and Bob founded Globex in 1998; the quick brown fox jumps."
    for i in range(12)
)
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": HISTORY},
    {"role": "assistant", "content": "Noted."},
    {"role": "user", "content": "Where does Alice work?"},
]


def serve_with(backend: Any, hooks: list[Any]) -> tuple[ServerThread, openai.OpenAI]:
    app = engine_app(backend, ServerConfig(served_model_names=(MODEL,)), hooks)
    server = ServerThread(app).start()
    return server, openai.OpenAI(api_key="unused", base_url=f"{server.url}/v1", max_retries=0, timeout=120)


def test_compress_hook_shrinks_the_prompt_and_reports_savings(tiny_llama: Path) -> None:
    backend = RecordingBackend(load_backend(f"hf:{tiny_llama}"))
    hook = build_hook("compress", {"scorer": backend.inner, "rate": 0.4})
    server, client = serve_with(backend, [hook])
    try:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=CONVERSATION, max_tokens=4, temperature=0)
        original = int(raw.headers["x-terse-original-prompt-tokens"])
        sent = int(raw.headers["x-terse-sent-prompt-tokens"])
        assert sent < 0.8 * original
        usage = raw.parse().usage
        assert usage is not None and usage.model_extra is not None
        assert usage.model_extra["terse"]["saved_prompt_tokens"] == original - sent
        assert usage.prompt_tokens <= sent + 2  # what the model read is the compressed prompt (+ BOS)
    finally:
        server.stop()


def test_retrieve_hook_adds_passages_before_the_question(tiny_llama: Path, tmp_path: Path) -> None:
    from terse.retrieval import Document, Retriever

    retriever = Retriever()
    retriever.add_documents([
        Document(id="acme", text="Alice works at Acme Corp in Paris."),
        Document(id="globex", text="Bob founded Globex in 1998."),
    ])
    retriever.save(tmp_path / "index")
    backend = RecordingBackend(load_backend(f"hf:{tiny_llama}"))
    hook = build_hook("retrieve", {"index": str(tmp_path / "index"), "top_k": 1})
    server, client = serve_with(backend, [hook])
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=CONVERSATION[-1:], max_tokens=2, temperature=0
        )
        assert int(raw.headers["x-terse-saved-prompt-tokens"]) < 0  # retrieval adds tokens, and says so
        prompt = backend.prompts[-1]
        assert "Alice works at Acme Corp in Paris." in prompt
        assert prompt.index("Acme Corp in Paris") < prompt.index("Where does Alice work?")
    finally:
        server.stop()


def test_unknown_hook_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="compress"):
        build_hook("summarize", {})
    with pytest.raises(ConfigError, match="known: cache_chars, protect, rate, scorer, target, tokenizer"):
        build_hook("compress", {"ratio": 0.5})
    assert build_hook("compress", {}).compressor.scorer is None  # scorer-free by default


def test_compress_hook_counts_in_the_named_tokenizer_and_keeps_its_caches(tiny_llama: Path) -> None:
    hook = build_hook("compress", {"rate": 0.25, "tokenizer": str(tiny_llama), "cache_chars": 50_000})
    assert isinstance(hook, CompressHook) and hook.budget_count == "tokenizer"
    assert isinstance(hook.compressor.tokenizer, FastTokenizerTarget)  # offsets: each text tokenized once
    assert hook.policy.protect == ProtectionPolicy.standard()
    assert hook.compressor.analyses.max_chars == 50_000 == hook.layouts.max_chars
    assert len(hook.compressor.analyses) == 0  # the warm-up leaves nothing behind
    request = parse_chat({"model": MODEL, "messages": CONVERSATION}, ServerConfig())
    first = hook.on_request(request)
    assert first.notes["compressed_messages"] == "1" and first.wire_messages is not None
    cached = (len(hook.compressor.analyses), len(hook.layouts))
    assert cached[0] >= 1 and cached[1] >= 1
    again = hook.on_request(request)  # the same conversation again: served from the caches
    assert again.wire_messages == first.wire_messages
    assert (len(hook.compressor.analyses), len(hook.layouts)) == cached


def test_compress_hook_options_are_checked() -> None:
    estimate = build_hook("compress", {"protect": "numbers, urls"})
    assert isinstance(estimate, CompressHook) and estimate.budget_count == "estimate"
    assert isinstance(estimate.compressor.tokenizer, CharEstimateTarget)
    assert estimate.policy.protect == ProtectionPolicy(numbers=True, urls=True)
    assert protection("none") == ProtectionPolicy() and protection("default") == ProtectionPolicy.standard()
    for bad in (-1, "many", True):
        with pytest.raises(ConfigError, match="cache_chars="):
            build_hook("compress", {"cache_chars": bad})
    with pytest.raises(ConfigError, match="target_tokenizer=42"):
        build_hook("compress", {"tokenizer": 42})
    with pytest.raises(ConfigError, match="unknown protection"):
        build_hook("compress", {"protect": "numbers,adjectives"})
