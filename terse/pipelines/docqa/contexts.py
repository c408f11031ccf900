"""Context sources: which passages of the corpus a question's prompt holds.

`ContextSource.passages(question)` is the one contract: passages in prompt order, each traceable to
its document by character offsets. Two sources, chosen through `build_context_source`:

- `WholeDocuments`: the question's documents (all documents when it names none), pasted whole.
- `RetrievedChunks`: the top-k chunks of a terse.retrieval index, searched within the question's
  documents when it names some.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def open_or_build_index(corpus: Mapping[str, Document], config: RetrievalConfig) -> Any:
    """A terse.retrieval `Retriever` over `corpus`: reopened from `config.index_dir` when it holds one
    (documents added or changed since are indexed incrementally), built in memory otherwise."""
    from terse.retrieval import Retriever
    from terse.retrieval.config import ChunkerConfig, EmbedderConfig, RetrieverConfig

    retriever_config = RetrieverConfig(
        chunker=ChunkerConfig(chunk_tokens=config.chunk_tokens, overlap_tokens=config.overlap_tokens),
        embedder=EmbedderConfig(model=config.embedder),
    )
    index_dir = Path(config.index_dir) if config.index_dir else None
    if index_dir is not None and index_dir.exists():
        retriever = Retriever.open(index_dir)
    else:
        retriever = Retriever(retriever_config)
    retriever.add_documents(list(corpus.values()))
    if index_dir is not None:
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


def build_context_source(
    corpus: Mapping[str, Document], config: RetrievalConfig, retriever: Any | None = None
) -> ContextSource:
    """The source the config asks for; `retriever` reuses an already opened index."""
    if not config.enabled:
        return WholeDocuments(corpus)
    return RetrievedChunks(retriever or open_or_build_index(corpus, config), config)


def passage_key(passages: Sequence[Passage]) -> tuple[tuple[str, int, int], ...]:
    """Identity of a passage list: equal keys mean byte-identical document parts of the prompt."""
    return tuple((p.doc_id, p.char_start, p.char_end) for p in passages)


def is_index_dir(path: str | Path) -> bool:
    """True when `path` is a saved terse.retrieval index (it holds the published-version pointer)."""
    from terse.retrieval.persistence import CURRENT

    return (Path(path) / CURRENT).is_file()
