"""Hooks that put terse's layers on the chat path: compression (terse.compress) and retrieval
(terse.retrieval). Built by name through `hooks.build_hook("compress" | "retrieve", options)`.

Order matters when both run: retrieve first (it adds passages), then compress (it shrinks them with
everything else). `terse serve` builds them in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any

from terse.backend.base import Backend
from terse.backend.types import Message
from terse.compress import (
    Budget,
    CompressorConfig,
    MessagePolicy,
    PromptCompressor,
    ProtectionPolicy,
    compress_messages,
)
from terse.errors import ConfigError, InvalidRequestError
from terse.pipelines.server.hooks import ChatResult, TokenCount
from terse.pipelines.server.schema import ChatRequest

_NOT_PROTECTED_BY_DEFAULT = ("json_keys", "role_labels", "markdown")
"""Structural detectors the compress hook leaves off by default: they guard the look of structured
prompts, not facts an answer needs (numbers, dates, URLs, e-mails and code are protected)."""


class CompressHook:
    """Compresses the documents of each chat request wherever they sit (`terse.compress.compress_messages`).

    Documents are found by layout (system turn, the last user turn beside the question, JSON tool
    results, earlier turns); instructions and the question stay verbatim, every other message field and
    the role sequence are kept. Answers pass unchanged. Each request gets notes for the accounting:
    which messages were compressed, which long ones were left verbatim because no layout was recognised,
    and whether budgets were counted with the model's tokenizer or estimated.
    """

    name = "compress"

    def __init__(self, compressor: PromptCompressor, policy: MessagePolicy, budget_count: TokenCount) -> None:
        self.compressor = compressor
        self.policy = policy
        self.budget_count = budget_count

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CompressHook:
        """Options (all optional):

        - `rate` (fraction of the documents' tokens kept, default 0.5) or `target` (most content tokens
          of the whole conversation): give at most one;
        - `tokenizer`: the upstream model's tokenizer (a path / hub name, a Backend, or a `str -> int`
          counter) to count budgets in; without one they are estimated (~4 characters per token);
        - `scorer`: a Backend or backend spec adding the model-based stages (LM token pruning); without
          one compression is scorer-free (BM25 context and sentence ranking, exact fit);
        - `protect`: a `ProtectionPolicy`, or flag names ("numbers", "code_blocks", ...), or "none";
          default: every structural detector except JSON keys, role labels and markdown.
        """
        from terse.backend.registry import load_backend

        unknown = set(options) - {"rate", "target", "tokenizer", "scorer", "protect"}
        if unknown:
            raise ConfigError(f"unknown compress hook options {sorted(unknown)}; known: rate, target, tokenizer, scorer, protect")
        rate, target = options.get("rate"), options.get("target")
        if rate is not None and target is not None:
            raise ConfigError(f"give the compress hook rate={rate!r} or target={target!r}, not both")
        budget = Budget(target_tokens=int(target)) if target is not None else Budget(rate=float(rate if rate is not None else 0.5))
        count, budget_count = _counter(options.get("tokenizer"))
        scorer = options.get("scorer")
        backend: Backend | None = load_backend(scorer) if isinstance(scorer, str) else scorer
        config = CompressorConfig() if backend is not None else CompressorConfig(token_pruner=None)
        policy = MessagePolicy(budget=budget, protect=protection(options.get("protect", "default")))
        hook = cls(PromptCompressor(backend, count, config), policy, budget_count)
        hook.warm_up()
        return hook

    def warm_up(self) -> None:
        """One small compression, so the first request does not pay for imports (bm25s) and lazy loads."""
        text = "Alpha works at Beta in Gamma since 1990. " * 8
        self.compressor.compress([text, text], budget=Budget(rate=0.5), question="Where does Alpha work?")

    def on_request(self, request: ChatRequest) -> ChatRequest:
        try:
            compressed = compress_messages(self.compressor, request.wire_messages or request.messages, self.policy)
        except InvalidRequestError:
            # the verbatim text (or the protected spans) alone exceed the budget: forward as sent, and say so
            return request.with_notes(compress_budget_count=self.budget_count, compress_skipped="verbatim-over-budget")
        report = compressed.report
        notes = request.with_notes(
            compress_budget_count=self.budget_count,
            compressed_messages=_indices(report.compressed),
            unrecognised_messages=_indices(report.unrecognised),
        )
        if compressed.result is None:
            return notes
        return notes.with_wire_messages(tuple(compressed.messages))

    def on_response(self, request: ChatRequest, result: ChatResult) -> ChatResult:
        return result


def protection(spec: ProtectionPolicy | str | Sequence[str]) -> ProtectionPolicy:
    """A `ProtectionPolicy` from flag names: "default", "none", or names such as ("numbers", "code_blocks")."""
    if isinstance(spec, ProtectionPolicy):
        return spec
    flags = [f.name for f in fields(ProtectionPolicy) if f.type in ("bool", bool)]
    if spec == "default":
        names = [f for f in flags if f not in _NOT_PROTECTED_BY_DEFAULT]
    elif spec == "none":
        names = []
    else:
        names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    bad = [n for n in names if n not in flags]
    if bad:
        raise ConfigError(f"unknown protection {bad}; choose from {flags}, 'default' or 'none'")
    switched_on: dict[str, Any] = {n: True for n in names}
    return ProtectionPolicy(**switched_on)


def _counter(tokenizer: Any) -> tuple[Callable[[str], int], TokenCount]:
    if tokenizer is None:
        from terse.backend.openai_tokens import ApproxTokenizer

        return ApproxTokenizer().count_tokens, "estimate"
    if isinstance(tokenizer, str):
        from terse.backend.openai_tokens import LocalTokenizer

        return LocalTokenizer(tokenizer).count_tokens, "tokenizer"
    if isinstance(tokenizer, Backend):
        return tokenizer.count_tokens, "tokenizer"
    if callable(tokenizer):
        return tokenizer, "tokenizer"
    raise ConfigError(f"tokenizer={tokenizer!r} must be a path or hub name, a Backend or a str -> int counter")


def _indices(indices: Sequence[int]) -> str:
    return ",".join(map(str, indices)) or "none"


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
