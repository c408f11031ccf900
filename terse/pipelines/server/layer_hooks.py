"""Hooks that put terse's layers on the chat path: compression (terse.compress) and retrieval
(terse.retrieval). Built by name through `hooks.build_hook("compress" | "retrieve", options)`.

Order matters when both run: retrieve first (it adds passages), then compress (it shrinks them with
everything else). `terse serve` builds them in that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    TargetTokenizer,
    compress_messages,
    load_target_tokenizer,
    target_tokenizer_of,
)
from terse.compress.analysis import AnalysisCache
from terse.compress.layout_cache import LayoutCache
from terse.compress.tokenizer import CharEstimateTarget
from terse.errors import ConfigError, InvalidRequestError
from terse.pipelines.server.hooks import ChatResult, TokenCount
from terse.pipelines.server.schema import ChatRequest

DEFAULT_CACHE_CHARS = 2_000_000
"""Characters of analysed documents and turns a compress hook keeps between requests by default."""


class CompressHook:
    """Compresses the documents of each chat request wherever they sit (`terse.compress.compress_messages`).

    Documents are found by layout (system turn, the last user turn beside the question, JSON tool
    results, earlier turns); instructions and the question stay verbatim, every other message field and
    the role sequence are kept. Answers pass unchanged. Each request gets notes for the accounting:
    which messages were compressed, which long ones were left verbatim because no layout was recognised,
    and whether budgets were counted with the model's tokenizer or estimated.

    One hook keeps one compressor for its whole life: a document, system prompt or earlier turn seen
    in one request is not parsed, tokenized or analysed again in the next (a conversation resends its
    history every turn), within the bounded caches (`cache_chars`): the compressor's analyses and
    `layouts`, the parsed message layouts.
    """

    name = "compress"

    def __init__(
        self, compressor: PromptCompressor, policy: MessagePolicy, budget_count: TokenCount,
        layouts: LayoutCache | None = None,
    ) -> None:
        self.compressor = compressor
        self.policy = policy
        self.budget_count = budget_count
        self.layouts = layouts if layouts is not None else LayoutCache()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> CompressHook:
        """Options (all optional):

        - `rate` (fraction of the documents' tokens kept, default 0.5) or `target` (most content tokens
          of the whole conversation): give at most one;
        - `tokenizer`: the upstream model's tokenizer to count budgets in: a path / hub name (its fast
          tokenizer, `load_target_tokenizer`), a Backend, a `TargetTokenizer` or a `str -> int` counter;
          without one they are estimated (~4 characters per token, word by word) and reported as such;
        - `scorer`: a Backend or backend spec adding the model-based stages (LM token pruning); without
          one compression is scorer-free (BM25 context and sentence ranking, exact fit);
        - `protect`: a `ProtectionPolicy`, or flag names ("numbers", "code_blocks", ...), or "none";
          default: `ProtectionPolicy.standard()` (numbers incl. CJK numerals, dates, URLs, e-mail
          addresses, code spans and fences);
        - `cache_chars`: most characters of documents and turns whose analyses, and of messages whose
          parsed layouts, the hook keeps between requests (default 2,000,000: at most ~90 MB in all);
          0 keeps only the latest of each.
        """
        from terse.backend.registry import load_backend

        known = {"rate", "target", "tokenizer", "scorer", "protect", "cache_chars"}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"unknown compress hook options {sorted(unknown)}; known: {', '.join(sorted(known))}")
        rate, target = options.get("rate"), options.get("target")
        if rate is not None and target is not None:
            raise ConfigError(f"give the compress hook rate={rate!r} or target={target!r}, not both")
        budget = Budget(target_tokens=int(target)) if target is not None else Budget(rate=float(rate if rate is not None else 0.5))
        tokenizer, budget_count = budget_tokenizer(options.get("tokenizer"))
        cache_chars = options.get("cache_chars", DEFAULT_CACHE_CHARS)
        if isinstance(cache_chars, bool) or not isinstance(cache_chars, int) or cache_chars < 0:
            raise ConfigError(f"cache_chars={cache_chars!r} must be an int >= 0, e.g. {DEFAULT_CACHE_CHARS}")
        scorer = options.get("scorer")
        backend: Backend | None = load_backend(scorer) if isinstance(scorer, str) else scorer
        config = CompressorConfig() if backend is not None else CompressorConfig(token_pruner=None)
        policy = MessagePolicy(budget=budget, protect=protection(options.get("protect", "default")))
        analyses = AnalysisCache(tokenizer, max_chars=cache_chars)
        compressor = PromptCompressor(backend, config=config, analyses=analyses)
        hook = cls(compressor, policy, budget_count, LayoutCache(max_chars=cache_chars))
        hook.warm_up()
        return hook

    def warm_up(self) -> None:
        """One small compression, so the first request does not pay for imports and lazy loads (the CJK
        segmenter included). Leaves nothing in the cache."""
        text = "Alpha works at Beta in Gamma since 1990. 阿尔法自一九九〇年起在北京工作。 " * 8
        self.compressor.compress([text, text], budget=Budget(rate=0.5), question="Where does Alpha work?",
                                 protect=self.policy.protect)
        self.compressor.clear_caches()

    def on_request(self, request: ChatRequest) -> ChatRequest:
        try:
            messages = request.wire_messages or request.messages
            compressed = compress_messages(self.compressor, messages, self.policy, layouts=self.layouts)
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
    """A `ProtectionPolicy` from flag names: "default" (`ProtectionPolicy.standard()`), "none", or names
    such as ("numbers", "code_blocks"): exactly those switched on."""
    if isinstance(spec, ProtectionPolicy):
        return spec
    if spec == "default":
        return ProtectionPolicy.standard()
    flags = [f.name for f in fields(ProtectionPolicy) if f.type in ("bool", bool)]
    names = [] if spec == "none" else [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    bad = [n for n in names if n not in flags]
    if bad:
        raise ConfigError(f"unknown protection {bad}; choose from {flags}, 'default' or 'none'")
    switched_on: dict[str, Any] = {n: True for n in names}
    return ProtectionPolicy(**switched_on)


def budget_tokenizer(tokenizer: Any) -> tuple[TargetTokenizer, TokenCount]:
    """The tokenizer compression budgets are counted in, and whether that is the model's or an estimate.

    A path or hub name loads its fast tokenizer with offsets (each document tokenized once, the fit
    priced from offsets); a Backend gives its own tokenizer (offsets when it holds a fast one); a bare
    counter measures as it goes; None estimates (~4 characters per token, word by word)."""
    if tokenizer is None:
        return CharEstimateTarget(), "estimate"
    if isinstance(tokenizer, str):
        return load_target_tokenizer(tokenizer), "tokenizer"
    return target_tokenizer_of(tokenizer), "tokenizer"  # a ConfigError names anything else


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
