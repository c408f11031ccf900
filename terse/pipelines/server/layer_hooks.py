"""Hooks that put terse's layers on the chat path: compression (terse.compress) and retrieval
(terse.retrieval). Built by name through `hooks.build_hook("compress" | "retrieve", options)`.

Order matters when both run: retrieve first (it adds passages), then compress (it shrinks them with
everything else). `terse serve` builds them in that order.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from terse.backend.base import Backend
from terse.backend.types import Message
from terse.errors import ConfigError
from terse.pipelines.server.hooks import ChatResult
from terse.pipelines.server.schema import ChatRequest


class CompressHook:
    """Compresses each chat request with `compress_messages` under a `MessagePolicy`.

    With the default policy the system prompt and the last user turn stay verbatim; long history and
    context turns are compressed, conditioned on the last user turn. Answers pass unchanged.
    """

    name = "compress"

    def __init__(self, compressor: Any, policy: Any) -> None:
        self.compressor = compressor
        self.policy = policy

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CompressHook:
        """Options: `scorer` (a Backend or a backend spec, required), `rate` (fraction kept, default 0.5)."""
        from terse.backend.registry import load_backend
        from terse.compress import Budget, MessagePolicy, PromptCompressor

        scorer = options.get("scorer")
        if scorer is None:
            raise ConfigError("the compress hook needs a scorer: a Backend or a spec such as 'hf:path/to/model'")
        backend: Backend = load_backend(scorer) if isinstance(scorer, str) else scorer
        policy = MessagePolicy(budget=Budget(rate=float(options.get("rate", 0.5))))
        return cls(PromptCompressor(backend), policy)

    def on_request(self, request: ChatRequest) -> ChatRequest:
        from terse.compress import compress_messages

        compressed = compress_messages(self.compressor, request.messages, self.policy)
        if compressed.result is None:
            return request  # already within budget
        return request.with_messages(tuple(compressed.messages))

    def on_response(self, request: ChatRequest, result: ChatResult) -> ChatResult:
        return result


class RetrieveHook:
    """Adds the top-k passages for the last user turn as a system message just before that turn.

    The index is opened, and searched, on one dedicated thread: a Retriever keeps an SQLite connection,
    which may only be used from the thread that opened it, while hooks run on any worker thread.
    """

    name = "retrieve"

    def __init__(self, index: str | Path, top_k: int = 4) -> None:
        if top_k < 1:
            raise ConfigError(f"top_k={top_k} must be >= 1")
        self.top_k = top_k
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="terse-retrieve")
        self._retriever = self._worker.submit(self._open, Path(index)).result()

    @staticmethod
    def _open(index: Path) -> Any:
        from terse.retrieval import Retriever

        return Retriever.open(index)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RetrieveHook:
        """Options: `index` (directory of a saved terse.retrieval index, required), `top_k` (default 4)."""
        index = options.get("index")
        if index is None:
            raise ConfigError("the retrieve hook needs index=<directory of a saved terse.retrieval index>")
        return cls(index, int(options.get("top_k", 4)))

    def on_request(self, request: ChatRequest) -> ChatRequest:
        messages = list(request.messages)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None or not messages[last_user]["content"].strip():
            return request
        query = messages[last_user]["content"]
        hits = self._worker.submit(self._retriever.search, query, k=self.top_k).result()
        if not hits:
            return request
        passages = "\n\n".join(f"[{i}] ({h.doc_id}) {h.text}" for i, h in enumerate(hits, start=1))
        context: Message = {"role": "system", "content": f"Relevant passages:\n\n{passages}"}
        return request.with_messages(tuple(messages[:last_user] + [context] + messages[last_user:]))

    def on_response(self, request: ChatRequest, result: ChatResult) -> ChatResult:
        return result
