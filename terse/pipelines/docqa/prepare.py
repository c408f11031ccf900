"""Turning a question into its prompt: passages -> (compressed) contexts -> chat prompt, with sources.

The prompt layout is shared part first: the fixed instructions (system turn), then the documents,
then the question (`terse.organize.formats.qa_messages`). Questions over the same documents therefore
share every token up to "Question:", and `schedule()` puts them next to each other so a prefix cache
prefills that part once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from terse.backend.base import Backend
from terse.backend.types import Message
from terse.compress.analysis import AnalysisCache
from terse.compress.compressor import PromptCompressor
from terse.compress.config import Budget
from terse.compress.result import CompressionResult
from terse.compress.tokenizer import target_tokenizer_of
from terse.organize.formats import Context, qa_messages
from terse.pipelines.docqa.config import CompressionConfig
from terse.pipelines.docqa.contexts import ContextSource, passage_key, relevant_documents
from terse.pipelines.docqa.prepare_pool import PreparePool
from terse.pipelines.docqa.records import Passage, QuestionRecord, Source
from terse.retrieval.types import Document

_PLACEHOLDER = "?"


@dataclass(frozen=True)
class PreparedQuestion:
    """Everything needed to answer one question, decided before any generation."""

    record: QuestionRecord
    contexts: tuple[Context, ...]
    """(label, text) pairs in prompt order, as sent (compressed when compression is on); the label is the
    doc id, or "doc_id#n" for chunk n of it."""
    messages: tuple[Message, ...]
    """The chat messages (system, user)."""
    prompt: str
    """`messages` rendered with the backend's chat template."""
    sources: tuple[Source, ...]
    """Document ranges the contexts were taken from."""
    original_prompt_tokens: int
    """Tokens of the naive prompt (every relevant document whole)."""
    group_key: tuple[tuple[str, int, int], ...]
    """Equal keys mean identical documents part: such questions are scheduled together."""


class NaivePromptCounter:
    """Counts the tokens of the naive prompt, every relevant document pasted whole.

    Each document is counted once (its count cached by text, and shared with the compressor's
    analyses). Per document set, only the chat template is tokenized, with each document replaced by
    a stub of its first and last words, so the seams between documents and template tokenize as in
    the real prompt; the document's count minus its stub's is added, and the question's count. Exact
    when the tokenizer does not merge across a document's inner word boundaries (the reference
    tokenizer never does), up to the seam around the question (a token or two).
    """

    def __init__(self, backend: Backend, corpus: Mapping[str, Document], analyses: AnalysisCache | None = None) -> None:
        self.backend = backend
        self.corpus = corpus
        self.analyses = analyses or AnalysisCache(target_tokenizer_of(backend))
        self._base: dict[tuple[str, ...], int] = {}
        self._stubs: dict[str, tuple[str, int]] = {}
        self._placeholder_tokens = self.analyses.tokenizer.count(_PLACEHOLDER)

    def count(self, question: QuestionRecord) -> int:
        """Tokens of the naive prompt of `question`."""
        return self.documents_part(question) + self.analyses.tokenizer.count(question.question)

    def clear(self) -> None:
        """Forget every cached count (documents and document sets)."""
        self.analyses.clear()
        self._base.clear()
        self._stubs.clear()

    def documents_part(self, question: QuestionRecord) -> int:
        """Tokens of the naive prompt without the question (chat template, instructions, documents)."""
        key = question.doc_ids or ("*",)
        if key not in self._base:
            docs = relevant_documents(question, self.corpus)
            stubs = [self._stub(d.text) for d in docs]
            skeleton = self.backend.render_chat(qa_messages(_PLACEHOLDER, [(d.id, s) for d, (s, _) in zip(docs, stubs)]))
            self._base[key] = (self.analyses.tokenizer.count(skeleton) - self._placeholder_tokens
                               + sum(self.analyses.count(d.text) - n for d, (_, n) in zip(docs, stubs)))
        return self._base[key]

    def _stub(self, text: str) -> tuple[str, int]:
        """(first word + " " + last word, with the text's outer whitespace; its tokens), cached."""
        hit = self._stubs.get(text)
        if hit is None:
            first, last = _FIRST_WORD_RE.search(text), _LAST_WORD_RE.search(text)
            stub = text if first is None or last is None or last.start() <= first.end() else (
                text[: first.end()] + " " + text[last.start() :])
            hit = self._stubs[text] = (stub, self.analyses.tokenizer.count(stub))
        return hit


_FIRST_WORD_RE = re.compile(r"\S+")
_LAST_WORD_RE = re.compile(r"\S+\s*\Z")


class Preparer:
    """Builds `PreparedQuestion`s from questions: context source, optional compressor, chat template."""

    def __init__(
        self,
        backend: Backend,
        corpus: Mapping[str, Document],
        source: ContextSource,
        compression: CompressionConfig,
        naive: NaivePromptCounter | None = None,
    ) -> None:
        self.backend = backend
        self.source = source
        self.compression = compression
        self.naive = naive or NaivePromptCounter(backend, corpus)
        self.compressor = _build_compressor(backend, compression, self.naive.analyses) if compression.enabled else None

    def clear_caches(self) -> None:
        """Forget everything cached about documents (counts, analyses, ranking statistics)."""
        self.naive.clear()
        if self.compressor is not None:
            self.compressor.clear_caches()

    def prepare(self, question: QuestionRecord) -> PreparedQuestion:
        """Passages, compression and prompt of one question. Raises what the stages raise."""
        return self._finish(question, self.source.passages(question))

    def prepare_all(self, questions: Sequence[QuestionRecord], workers: int = 1,
                    pool: PreparePool | None = None) -> list[PreparedQuestion | Exception]:
        """`prepare` for each question, in order; a question's error takes its place in the list.

        Passages are found on the calling thread (a retrieval index is not shared between threads).
        Scorer-free compression runs on `pool`'s worker processes when one is given (pure Python holds
        the GIL: processes are what parallelise it), else on this thread; when compression calls the
        model, it runs on up to `workers` threads, so the scorer calls of several questions reach the
        backend together and a local engine batches them into shared forward passes.
        """
        found: list[list[Passage] | Exception] = []
        for question in questions:
            try:
                found.append(self.source.passages(question))
            except Exception as e:  # a question that cannot be prepared fails alone
                found.append(e)
        compressed = self._compress_on(pool, questions, found)

        def finish(question: QuestionRecord, passages: list[Passage] | Exception,
                   result: CompressionResult | Exception | None = None) -> PreparedQuestion | Exception:
            if isinstance(passages, Exception):
                return passages
            if isinstance(result, Exception):
                return result
            try:
                return self._finish(question, passages, result)
            except Exception as e:
                return e

        if compressed is not None:
            return [finish(q, p, r) for q, p, r in zip(questions, found, compressed)]

        pending = sum(not isinstance(p, Exception) for p in found)
        calls_model = self.compressor is not None and self.compressor.scorer is not None
        if workers <= 1 or pending <= 1 or not calls_model:  # threads only pay when there are model calls
            return [finish(q, p) for q, p in zip(questions, found)]
        with ThreadPoolExecutor(max_workers=min(workers, pending), thread_name_prefix="terse-prepare") as threads:
            return list(threads.map(finish, questions, found))

    def _compress_on(self, pool: PreparePool | None, questions: Sequence[QuestionRecord],
                     found: Sequence[list[Passage] | Exception]) -> list[CompressionResult | Exception | None] | None:
        """Compression results from the pool's workers (None in a question's place when it has no
        passages or failed earlier), or None when there is no live pool."""
        if pool is None or not pool.alive or self.compressor is None:
            return None
        todo = [k for k, p in enumerate(found) if not isinstance(p, Exception) and p]
        if not todo:
            return [None] * len(questions)
        jobs = [([p.text for p in found[k]], questions[k].question) for k in todo]  # type: ignore[union-attr]
        results = pool.compress(jobs, self.budget())
        if results is None:  # the pool broke: this batch compresses in process
            return None
        out: list[CompressionResult | Exception | None] = [None] * len(questions)
        for k, result in zip(todo, results):
            out[k] = result
        return out

    def budget(self) -> Budget:
        """The compression budget of every question."""
        return self.compression.budget

    def _finish(self, question: QuestionRecord, passages: list[Passage],
                result: CompressionResult | None = None) -> PreparedQuestion:
        if self.compressor is None:
            contexts = [(p.name, p.text) for p in passages]
            sources = [Source(p.doc_id, p.char_start, p.char_end) for p in passages]
        else:
            contexts, sources = self._compress(question, passages, result)
        messages = qa_messages(question.question, contexts)
        return PreparedQuestion(
            record=question,
            contexts=tuple(contexts),
            messages=tuple(messages),
            prompt=self.backend.render_chat(messages),
            sources=tuple(sources),
            original_prompt_tokens=self.naive.count(question),
            group_key=passage_key(passages),
        )

    def _compress(self, question: QuestionRecord, passages: Sequence[Passage],
                  result: CompressionResult | None = None) -> tuple[list[Context], list[Source]]:
        assert self.compressor is not None
        if not passages:
            return [], []
        if result is None:
            result = self.compressor.compress([p.text for p in passages], budget=self.budget(),
                                              question=question.question)
        contexts = [(passages[i].name, result.contexts[i]) for i in result.context_order if result.contexts[i]]
        sources = [
            Source(passages[s.context_index].doc_id, passages[s.context_index].char_start + s.start,
                   passages[s.context_index].char_start + s.end)
            for s in result.spans
        ]
        return contexts, _merge_adjacent(sources)


def _build_compressor(backend: Backend, config: CompressionConfig, analyses: AnalysisCache) -> PromptCompressor:
    scorer = backend if config.compressor.calls_model() else None
    return PromptCompressor(scorer, backend, config.compressor, analyses=analyses)


def _merge_adjacent(sources: Sequence[Source]) -> list[Source]:
    """Join ranges of one document that touch or are separated only by whitespace-sized gaps."""
    merged: list[Source] = []
    for s in sorted(sources, key=lambda s: (s.doc_id, s.char_start)):
        last = merged[-1] if merged else None
        if last is not None and last.doc_id == s.doc_id and s.char_start <= last.char_end + 1:
            merged[-1] = Source(s.doc_id, last.char_start, max(last.char_end, s.char_end))
        else:
            merged.append(s)
    return merged


def schedule(prepared: Sequence[PreparedQuestion]) -> list[PreparedQuestion]:
    """Questions with identical documents parts next to each other (groups in first-seen order)."""
    groups: dict[tuple[tuple[str, int, int], ...], list[PreparedQuestion]] = {}
    for p in prepared:
        groups.setdefault(p.group_key, []).append(p)
    return [p for group in groups.values() for p in group]
