"""The compression and retrieval hooks on the chat path of `terse serve` (engine mode, tiny model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from terse.backend import load_backend
from terse.errors import ConfigError
from terse.pipelines.server import ServerConfig, ServerThread, engine_app
from terse.pipelines.server.hooks import build_hook
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
    with pytest.raises(ConfigError, match="known: rate, target, tokenizer, scorer, protect"):
        build_hook("compress", {"ratio": 0.5})
    assert build_hook("compress", {}).compressor.scorer is None  # scorer-free by default
