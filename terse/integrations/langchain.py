"""terse in LangChain: `TerseCompressor` (a document compressor) and `TerseRetriever` (a terse index).

Needs the `langchain` extra (langchain-core). Both are plain LangChain components:

    from langchain_classic.retrievers import ContextualCompressionRetriever
    from terse.integrations.langchain import TerseCompressor, TerseRetriever

    retriever = ContextualCompressionRetriever(
        base_compressor=TerseCompressor(rate=0.5),
        base_retriever=TerseRetriever(index="my-index", k=8),
    )
    docs = retriever.invoke("Where does Alice work?")

`TerseCompressor` compresses the documents it is given for the query, to `rate` or `target_tokens` over
all of them, without a model unless `scorer` names one (see `terse.integrations.common`). Documents come
back most relevant first, with their metadata plus `terse_rank` and `terse_kept_ratio`; a document
compressed to nothing is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.callbacks import CallbackManagerForRetrieverRun, Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.retrievers import BaseRetriever
from pydantic import PrivateAttr

from terse.integrations.common import IndexSearcher, compress_texts, hit_metadata
from terse.integrations.fields import CompressionFields


class TerseCompressor(CompressionFields, BaseDocumentCompressor):
    """Question-aware compression of retrieved documents (see the module docstring)."""

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        compressor = self._compressor.get()
        budget = self._compressor.settings.budget
        kept = compress_texts(compressor, budget, [d.page_content for d in documents], query)
        return [
            Document(
                page_content=k.text,
                id=documents[k.index].id,
                metadata={
                    **documents[k.index].metadata,
                    "terse_rank": k.report.rank,
                    "terse_kept_ratio": round(k.report.kept_ratio, 4),
                },
            )
            for k in kept
        ]


class TerseRetriever(BaseRetriever):
    """The top-`k` chunks of a saved terse index (`terse index DOCS -o DIR`) for a query.

    Each Document is one chunk; its metadata holds `doc_id`, `chunk_id`, `chunk_index`, `char_start`,
    `char_end` and `score`.
    """

    index: str
    """Directory of the saved index."""
    k: int = 4
    """Chunks returned per query."""
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    """Dense (embeddings), BM25, or both fused."""

    _searcher: IndexSearcher = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._searcher = IndexSearcher(self.index)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        hits = self._searcher.search(query, self.k, self.mode)
        return [Document(page_content=h.text, metadata=hit_metadata(h)) for h in hits]


__all__ = ["TerseCompressor", "TerseRetriever"]
