"""Turning a question into its prompt: passages -> (compressed) contexts -> chat prompt, with sources.

The prompt layout is shared part first: the fixed instructions (system turn), then the documents,
then the question (`terse.organize.formats.qa_messages`). Questions over the same documents therefore
share every token up to "Question:", and `schedule()` puts them next to each other so a prefix cache
prefills that part once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from terse.backend.base import Backend
from terse.backend.types import Message
from terse.compress.analysis import AnalysisCache
from terse.compress.compressor import PromptCompressor
from terse.compress.config import Budget, CompressorConfig
from terse.compress.tokenizer import target_tokenizer_of
from terse.organize.formats import Context, qa_messages
from terse.pipelines.docqa.config import CompressionConfig
from terse.pipelines.docqa.contexts import ContextSource, passage_key, relevant_documents
from terse.pipelines.docqa.records import Passage, QuestionRecord, Source
from terse.retrieval.types import Document

_PLACEHOLDER = "?"
_STAND_IN = "x"  # stands in for each document in the template whose tokens are counted


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
    analyses); per document set, only the chat template around the documents is tokenized, with a
    one-token stand-in for each document, and the question is added. Exact when the tokenizer does
    not merge a document's first or last characters with the template text around it (the reference
    tokenizer never does); otherwise off by a token or two per document, as the seam around the
    question always may be.
    """

    def __init__(self, backend: Backend, corpus: Mapping[str, Document], analyses: AnalysisCache | None = None) -> None:
        self.backend = backend
        self.corpus = corpus
        self.analyses = analyses or AnalysisCache(target_tokenizer_of(backend))
        self._base: dict[tuple[str, ...], int] = {}
        self._placeholder_tokens = self.analyses.tokenizer.count(_PLACEHOLDER)
        self._stand_in_tokens = self.analyses.tokenizer.count(_STAND_IN)

    def count(self, question: QuestionRecord) -> int:
        """Tokens of the naive prompt of `question`."""
        return self.documents_part(question) + self.analyses.tokenizer.count(question.question)

    def documents_part(self, question: QuestionRecord) -> int:
        """Tokens of the naive prompt without the question (chat template, instructions, documents)."""
        key = question.doc_ids or ("*",)
        if key not in self._base:
            docs = relevant_documents(question, self.corpus)
            skeleton = self.backend.render_chat(qa_messages(_PLACEHOLDER, [(d.id, _STAND_IN) for d in docs]))
            self._base[key] = (self.analyses.tokenizer.count(skeleton) - self._placeholder_tokens
                               + sum(self.analyses.count(d.text) - self._stand_in_tokens for d in docs))
        return self._base[key]


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

    def prepare(self, question: QuestionRecord) -> PreparedQuestion:
        """Passages, compression and prompt of one question. Raises what the stages raise."""
        return self._finish(question, self.source.passages(question))

    def prepare_all(self, questions: Sequence[QuestionRecord], workers: int = 1) -> list[PreparedQuestion | Exception]:
        """`prepare` for each question, in order; a question's error takes its place in the list.

        Passages are found on the calling thread (a retrieval index is not shared between threads);
        when compression calls the model, it runs on up to `workers` threads, so the scorer calls of
        several questions reach the backend together and a local engine batches them into shared
        forward passes (scorer-free compression is pure Python and stays on this thread).
        """
        found: list[list[Passage] | Exception] = []
        for question in questions:
            try:
                found.append(self.source.passages(question))
            except Exception as e:  # a question that cannot be prepared fails alone
                found.append(e)

        def finish(question: QuestionRecord, passages: list[Passage] | Exception) -> PreparedQuestion | Exception:
            if isinstance(passages, Exception):
                return passages
            try:
                return self._finish(question, passages)
            except Exception as e:
                return e

        pending = sum(not isinstance(p, Exception) for p in found)
        calls_model = self.compressor is not None and self.compressor.scorer is not None
        if workers <= 1 or pending <= 1 or not calls_model:  # threads only pay when there are model calls
            return [finish(q, p) for q, p in zip(questions, found)]
        with ThreadPoolExecutor(max_workers=min(workers, pending), thread_name_prefix="terse-prepare") as pool:
            return list(pool.map(finish, questions, found))

    def _finish(self, question: QuestionRecord, passages: list[Passage]) -> PreparedQuestion:
        if self.compressor is None:
            contexts = [(p.name, p.text) for p in passages]
            sources = [Source(p.doc_id, p.char_start, p.char_end) for p in passages]
        else:
            contexts, sources = self._compress(question, passages)
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

    def _compress(self, question: QuestionRecord, passages: Sequence[Passage]) -> tuple[list[Context], list[Source]]:
        assert self.compressor is not None
        if not passages:
            return [], []
        c = self.compression
        budget = Budget(target_tokens=c.target_tokens) if c.target_tokens is not None else Budget(rate=c.rate)
        result = self.compressor.compress([p.text for p in passages], budget=budget, question=question.question)
        contexts = [(passages[i].name, result.contexts[i]) for i in result.context_order if result.contexts[i]]
        sources = [
            Source(passages[s.context_index].doc_id, passages[s.context_index].char_start + s.start,
                   passages[s.context_index].char_start + s.end)
            for s in result.spans
        ]
        return contexts, _merge_adjacent(sources)


def _build_compressor(backend: Backend, config: CompressionConfig, analyses: AnalysisCache) -> PromptCompressor:
    needs_scorer = config.ranker == "lm" or config.token_pruner
    compressor_config = CompressorConfig(
        ranker=config.ranker,
        sentence_ranker="same" if config.ranker is not None else None,
        token_pruner="parallel" if config.token_pruner else None,
        reorder="original",
    )
    return PromptCompressor(backend if needs_scorer else None, backend, compressor_config, analyses=analyses)


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
