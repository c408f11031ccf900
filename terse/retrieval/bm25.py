"""Lexical search with BM25 (bm25s), over the same chunks as the vector index.

bm25s builds a static sparse score matrix, so the index is rebuilt from the chunk store after the
corpus changes (lexical indexing is cheap next to embedding). It is saved in bm25s' own numpy/JSON
format (never pickled) with the chunk id of each row beside it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from terse.retrieval.bm25s_import import load_bm25s

if TYPE_CHECKING:
    import bm25s
else:
    bm25s = load_bm25s()

_ROW_IDS_FILE = "row_chunk_ids.npy"


def _tokenize(texts: Sequence[str]) -> list[list[str]]:
    # Lowercased word tokens of 2+ characters, English stop words removed (bm25s defaults).
    tokens = bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)
    return [list(t) for t in tokens]


class BM25Index:
    """BM25 over chunk texts; rows map to chunk ids through `row_chunk_ids`."""

    def __init__(self, model: bm25s.BM25, row_chunk_ids: np.ndarray) -> None:
        self.model = model
        self.row_chunk_ids = row_chunk_ids  # [num_rows] int64
        self._row_of = {int(c): r for r, c in enumerate(row_chunk_ids)}

    @classmethod
    def build(cls, chunk_ids: Sequence[int], texts: Sequence[str]) -> BM25Index:
        """Index `texts`; `chunk_ids[i]` is the id of `texts[i]`."""
        model = bm25s.BM25()
        model.index(_tokenize(texts), show_progress=False)
        return cls(model, np.asarray(chunk_ids, dtype=np.int64))

    @property
    def num_rows(self) -> int:
        return int(self.row_chunk_ids.size)

    def search(
        self, query: str, k: int, allowed_ids: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """([n] scores, [n] chunk ids), best first, n <= k; only chunks with a positive score count."""
        query_tokens = [t for t in _tokenize([query])[0] if t in self.model.vocab_dict]
        if not query_tokens or self.num_rows == 0:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        scores = self.model.get_scores(query_tokens)  # [num_rows]
        if allowed_ids is not None:
            mask = np.zeros(self.num_rows, dtype=bool)
            mask[[self._row_of[int(c)] for c in allowed_ids if int(c) in self._row_of]] = True
            scores = np.where(mask, scores, 0.0)
        num_top = min(k, self.num_rows)
        top = np.argpartition(-scores, num_top - 1)[:num_top]
        top = top[np.argsort(-scores[top], kind="stable")]
        top = top[scores[top] > 0]
        return scores[top].astype(np.float32), self.row_chunk_ids[top]

    def write(self, directory: Path) -> list[str]:
        """Save under `directory` (created); returns file names relative to it."""
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save(str(directory), allow_pickle=False, show_progress=False)
        np.save(directory / _ROW_IDS_FILE, self.row_chunk_ids)
        return sorted(p.name for p in directory.iterdir())

    @classmethod
    def read(cls, directory: Path) -> BM25Index:
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        model = bm25s.BM25.load(str(directory), allow_pickle=False, show_progress=False)
        return cls(model, np.load(directory / _ROW_IDS_FILE, allow_pickle=False))
