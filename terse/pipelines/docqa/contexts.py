"""Context sources: which passages of the corpus a question's prompt holds.

`ContextSource.passages(question)` is the one contract: passages in prompt order, each traceable to
its document by character offsets. Two sources, chosen through `build_context_source`:

- `WholeDocuments`: the question's documents (all documents when it names none), pasted whole.
- `RetrievedChunks`: the top-k chunks of a terse.retrieval index, searched within the question's
  documents when it names some.
- `RoutedContexts` (the default): whole documents below `min_context_tokens`, retrieval above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from terse.errors import RetrievalIndexError
from terse.pipelines.docqa.config import RetrievalConfig
from terse.pipelines.docqa.records import Passage, QuestionRecord
from terse.retrieval.types import Document


class ContextSource(Protocol):
    """Produces the passages of one question. Must be safe to call from one thread at a time."""

    def passages(self, question: QuestionRecord) -> list[Passage]: ...


def relevant_documents(question: QuestionRecord, corpus: Mapping[str, Document]) -> list[Document]:
    """The question's documents in the order it names them; the whole corpus (sorted by id) otherwise."""
    if question.doc_ids:
        return [corpus[d] for d in question.doc_ids]
    return [corpus[d] for d in sorted(corpus)]


class WholeDocuments:
    """Every relevant document, whole, in the question's order (the naive prompt's contents)."""

    def __init__(self, corpus: Mapping[str, Document]) -> None:
        self.corpus = corpus

    def passages(self, question: QuestionRecord) -> list[Passage]:
        return [Passage(d.id, 0, len(d.text), d.text) for d in relevant_documents(question, self.corpus)]


class RetrievedChunks:
    """The `top_k` best chunks for the question from a hybrid (or dense / BM25) index.

    Chunks are returned grouped by document and in document order within a group (documents ordered
    by their best chunk), so a passage reads as the document does and questions retrieving the same
    chunks get byte-identical prompts (and share their prefill).
    """

    def __init__(self, retriever: Any, config: RetrievalConfig) -> None:
        self.retriever = retriever
        self.config = config

    def passages(self, question: QuestionRecord) -> list[Passage]:
        doc_ids = list(question.doc_ids) or None
        hits = self.retriever.search(
            question.question, k=self.config.top_k, mode=self.config.mode, doc_ids=doc_ids
        )
        first_rank: dict[str, int] = {}
        for rank, hit in enumerate(hits):
            first_rank.setdefault(hit.doc_id, rank)
        ordered = sorted(hits, key=lambda h: (first_rank[h.doc_id], h.char_start))
        return [Passage(h.doc_id, h.char_start, h.char_end, h.text, f"{h.doc_id}#{h.chunk_index}") for h in ordered]


def documents_to_index(
    questions: Sequence[QuestionRecord], corpus: Mapping[str, Document], config: RetrievalConfig
) -> Mapping[str, Document]:
    """What a run must index: the documents its questions name when every question names some and no
    persistent index is kept (embedding the rest would be wasted), else the whole corpus."""
    if config.index_dir is not None or not questions or any(not q.doc_ids for q in questions):
        return corpus
    needed = {d for q in questions for d in q.doc_ids}
    return {d: doc for d, doc in corpus.items() if d in needed}


def may_need_retrieval(
    questions: Sequence[QuestionRecord], corpus: Mapping[str, Document], config: RetrievalConfig
) -> bool:
    """Whether any question may be routed to retrieval, without a tokenizer: characters / 2 over-
    estimates tokens for the tokenizers terse meets, so a question that needs the index is never missed."""
    if not config.enabled:
        return False
    if config.min_context_tokens == 0:
        return True
    sizes: dict[tuple[str, ...], int] = {}
    for q in questions:
        if q.doc_ids not in sizes:
            sizes[q.doc_ids] = sum(len(d.text) for d in relevant_documents(q, corpus))
    return any(num_chars / 2 > config.min_context_tokens for num_chars in sizes.values())


def open_or_build_index(corpus: Mapping[str, Document], config: RetrievalConfig) -> Any:
    """A terse.retrieval `Retriever` over `corpus`: reopened from `config.index_dir` when it holds one
    (documents added or changed since are indexed incrementally), built in memory otherwise."""
    from terse.retrieval import IndexLock, Retriever
    from terse.retrieval.persistence import current_version

    if not config.index_dir:
        retriever = Retriever(config.retriever)
        retriever.add_documents(list(corpus.values()))
        return retriever
    index_dir = Path(config.index_dir)
    with IndexLock(index_dir):  # another job or `terse index` updating it waits, so neither update is lost
        retriever = Retriever.open(index_dir) if current_version(index_dir) else Retriever(config.retriever)
        retriever.add_documents(list(corpus.values()))
        retriever.save(index_dir)
    return retriever


def documents_of_index(index_dir: str | Path) -> dict[str, Document]:
    """The documents of a saved retrieval index, rebuilt from its chunks (so a job runs from the index
    alone). Offsets stay exact; characters no chunk covers (whitespace between sentences) become spaces.
    """
    from terse.retrieval import Retriever

    retriever = Retriever.open(Path(index_dir))
    store = retriever.store
    corpus: dict[str, Document] = {}
    for doc_id in retriever.doc_ids():
        rows = sorted(store.chunks(store.chunk_ids_of([doc_id])).values(), key=lambda row: row[3])
        num_chars = max((row[4] for row in rows), default=0)
        chars = [" "] * num_chars
        for _, _, _, char_start, char_end, text in rows:
            chars[char_start:char_end] = text
        corpus[doc_id] = Document(doc_id, "".join(chars), store.metadata(doc_id))
    if not corpus:
        raise RetrievalIndexError(f"the index at {str(index_dir)!r} holds no documents; add some first")
    return corpus


class RoutedContexts:
    """Whole documents for questions whose documents fit `config.min_context_tokens`, retrieved chunks
    above it. The index is opened or built on the first question that needs it (never, if none does)."""

    def __init__(
        self,
        corpus: Mapping[str, Document],
        config: RetrievalConfig,
        context_tokens: Callable[[QuestionRecord], int],
        make_retriever: Callable[[], Any],
    ) -> None:
        self.whole = WholeDocuments(corpus)
        self.config = config
        self.context_tokens = context_tokens
        self.make_retriever = make_retriever
        self._retrieved: RetrievedChunks | None = None

    def passages(self, question: QuestionRecord) -> list[Passage]:
        if self.config.min_context_tokens and self.context_tokens(question) <= self.config.min_context_tokens:
            return self.whole.passages(question)
        if self._retrieved is None:
            self._retrieved = RetrievedChunks(self.make_retriever(), self.config)
        return self._retrieved.passages(question)


def build_context_source(
    corpus: Mapping[str, Document],
    config: RetrievalConfig,
    context_tokens: Callable[[QuestionRecord], int],
    make_retriever: Callable[[], Any],
) -> ContextSource:
    """The source the config asks for. `context_tokens(q)` counts the tokens of q's documents;
    `make_retriever()` opens or builds the index (called at most once, when first needed)."""
    if not config.enabled:
        return WholeDocuments(corpus)
    return RoutedContexts(corpus, config, context_tokens, make_retriever)


def passage_key(passages: Sequence[Passage]) -> tuple[tuple[str, int, int], ...]:
    """Identity of a passage list: equal keys mean byte-identical document parts of the prompt."""
    return tuple((p.doc_id, p.char_start, p.char_end) for p in passages)


def is_index_dir(path: str | Path) -> bool:
    """True when `path` is a saved terse.retrieval index (it holds the published-version pointer)."""
    from terse.retrieval.persistence import CURRENT

    return (Path(path) / CURRENT).is_file()
