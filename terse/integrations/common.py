"""What the LangChain, LlamaIndex and LiteLLM adapters share: compression settings and the compressor
they build, document compression with per-document reports, chat compression that keeps every message
field, and a thread-owning searcher over a saved terse index. Imports no framework.

Scorer-free by default: contexts are ranked with BM25 and trimmed sentence by sentence, no model
loaded. A `scorer` backend spec (e.g. "hf:path/to/model") adds the token-level pruning stage. Token
counts come from `tokenizer` (a Hugging Face tokenizer path or name, best: the model that will read
the prompt), else the scorer's tokenizer, else a word count (each CJK character a word), an
approximation that a `rate` budget does not mind and a `target_tokens` budget states in words.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from terse.errors import ConfigError

if TYPE_CHECKING:
    from terse.compress import Budget, ContextReport, PromptCompressor
    from terse.retrieval import Hit


@dataclass(frozen=True)
class CompressionSettings:
    """How an adapter compresses: a budget, an optional scorer and the tokenizer that counts."""

    budget: Budget = field(default_factory=lambda: _budget(None, None))
    """How much of the documents to keep (`Budget(rate=0.5)` by default)."""
    scorer: str | None = None
    """Backend spec of a scoring model for token-level pruning; None compresses without a model."""
    tokenizer: str | None = None
    """Hugging Face tokenizer (path or name) that counts tokens; None: the scorer's, else words."""

    def __post_init__(self) -> None:
        from terse.compress import Budget

        if not isinstance(self.budget, Budget):
            raise ConfigError(f"budget={self.budget!r} must be a Budget, e.g. Budget(rate=0.5)")

    @classmethod
    def of(
        cls, rate: float | None = None, target_tokens: int | None = None, scorer: str | None = None,
        tokenizer: str | None = None,
    ) -> CompressionSettings:
        """Settings from an adapter's keyword arguments: `rate` or `target_tokens` (rate 0.5 when
        neither is given; both raise `ConfigError`)."""
        return cls(_budget(rate, target_tokens), scorer, tokenizer)


def _budget(rate: float | None, target_tokens: int | None) -> Budget:
    from terse.compress import Budget

    if rate is not None and target_tokens is not None:
        raise ConfigError(
            f"give rate={rate} or target_tokens={target_tokens}, not both "
            f"(rate keeps a fraction, target_tokens a fixed size)"
        )
    if target_tokens is not None:
        return Budget(target_tokens=target_tokens)
    return Budget(rate=0.5 if rate is None else rate)


def build_compressor(settings: CompressionSettings) -> PromptCompressor:
    """The compressor `settings` describe (loads the scorer and tokenizer, if named)."""
    from terse.backend.registry import load_backend
    from terse.compress import CompressorConfig, PromptCompressor

    scorer = load_backend(settings.scorer) if settings.scorer else None
    counter: Callable[[str], int] | None = None
    if settings.tokenizer is not None:
        from terse.backend.openai_tokens import LocalTokenizer

        counter = LocalTokenizer(settings.tokenizer).count_tokens
    elif scorer is None:
        from terse.compress.words import split_words

        counter = lambda text: len(split_words(text))
    config = CompressorConfig() if scorer is not None else CompressorConfig(token_pruner=None)
    return PromptCompressor(scorer, counter, config)


class LazyCompressor:
    """Builds the compressor on first use, once, from any thread (frameworks construct adapters eagerly)."""

    def __init__(self, settings: CompressionSettings) -> None:
        self.settings = settings
        self._compressor: PromptCompressor | None = None
        self._lock = threading.Lock()

    def get(self) -> PromptCompressor:
        with self._lock:
            if self._compressor is None:
                self._compressor = build_compressor(self.settings)
            return self._compressor


@dataclass(frozen=True)
class KeptText:
    """One input text after compression."""

    index: int
    """Position of the text in the input."""
    text: str
    """What is kept of it."""
    report: ContextReport
    """Rank, score and token counts of this text."""


def compress_texts(compressor: PromptCompressor, budget: Budget, texts: Sequence[str], query: str) -> list[KeptText]:
    """Compress `texts` for `query` to `budget` (over the texts alone); kept texts, most relevant first.

    The query conditions the ranking and pruning but is not part of the budget. Texts compressed to
    nothing are left out.
    """
    if not texts:
        return []
    result = compressor.compress(list(texts), budget=budget, condition=query)
    return [
        KeptText(i, result.contexts[i], result.reports[i])
        for i in result.context_order
        if result.contexts[i]
    ]


def compress_chat(
    compressor: PromptCompressor, budget: Budget, messages: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Compressed copy of OpenAI-shaped chat `messages` through `terse.compress.compress_messages`.

    Messages keep every field but the rewritten text (names, tool calls, ids); a message whose content
    is not a plain string (image or audio parts) is kept whole and never rewritten.
    """
    from terse.compress import MessagePolicy, compress_messages
    from terse.compress.words import split_words

    roles = ("system", "user", "assistant", "tool")
    plain: list[dict[str, str]] = [
        {"role": str(m.get("role")) if m.get("role") in roles else "user",
         "content": str(m.get("content")) if isinstance(m.get("content"), str) else ""}
        for m in messages
    ]
    compressed = compress_messages(compressor, plain, MessagePolicy(budget=budget))  # type: ignore[arg-type]
    if compressed.result is None:
        return [dict(m) for m in messages]
    out: list[dict[str, Any]] = []
    pending = list(compressed.messages)
    for original, simple in zip(messages, plain):
        # compress_messages keeps order and roles and only shortens or drops turns: align by that
        if pending and pending[0]["role"] == simple["role"] and _is_kept_from(pending[0]["content"], simple["content"], split_words):
            kept = pending.pop(0)["content"]
            out.append({**original, "content": kept} if isinstance(original.get("content"), str) else dict(original))
            continue
        if not isinstance(original.get("content"), str):
            out.append(dict(original))  # never compressed: its content was not plain text
    return out


def _is_kept_from(kept: str, original: str, split_words: Callable[[str], Sequence[Any]]) -> bool:
    """Whether `kept` is made of `original`'s words, in order (what compression produces)."""
    if kept == original:
        return True
    words = iter(original[a:b] for a, b in split_words(original))
    return all(any(w == k for w in words) for k in (kept[a:b] for a, b in split_words(kept)))


class IndexSearcher:
    """Searches a saved terse index (`terse index` / `Retriever.save`) from any thread.

    A Retriever holds an SQLite connection usable only on the thread that opened it; this opens and
    searches it on one dedicated thread. The index opens on the first search.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="terse-index")
        self._retriever: Any = None

    def _search(self, query: str, k: int, mode: str) -> list[Hit]:
        if self._retriever is None:
            from terse.retrieval import Retriever

            self._retriever = Retriever.open(self.path)
        hits: list[Hit] = self._retriever.search(query, k=k, mode=mode)
        return hits

    def search(self, query: str, k: int, mode: str) -> list[Hit]:
        """The top-`k` chunks for `query`, best first (mode: "hybrid", "dense" or "bm25")."""
        return self._worker.submit(self._search, query, k, mode).result()

    def close(self) -> None:
        self._worker.shutdown(wait=False)


def hit_metadata(hit: Hit) -> dict[str, Any]:
    """The metadata an adapter attaches to a retrieved chunk."""
    return {
        "doc_id": hit.doc_id,
        "chunk_id": hit.chunk_id,
        "chunk_index": hit.chunk_index,
        "char_start": hit.char_start,
        "char_end": hit.char_end,
        "score": hit.score,
    }
