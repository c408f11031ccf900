"""Choosing the vector index kind and proving an approximate one good enough before using it.

Recall of HNSW / IVF depends on the data, so it is measured, not assumed: a seeded sample of the
indexed vectors serves as queries, exact search (IndexFlatIP over the same vectors) gives the true
top-k, and the search knob (efSearch / nprobe) is raised from its configured start until
recall@k >= `min_recall`. The report lands in the index's stats and manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from terse.retrieval.config import IndexConfig
from terse.retrieval.vector_index import INDEX_TYPES, VectorIndex


@dataclass(frozen=True)
class RecallReport:
    """Recall of an index against exact search, measured on a sample of its own vectors."""

    kind: str
    """Index kind measured."""
    recall: float
    """Mean |approximate top-k & exact top-k| / k over the sample."""
    k: int
    """k of recall@k."""
    num_queries: int
    """Indexed vectors used as queries."""
    num_vectors: int
    """Vectors in the index when measured."""
    knob: str | None
    """Search knob (ef_search, nprobe) or None for exact search."""
    knob_value: int | None
    """Knob value the recall was reached with (the value the index keeps)."""
    meets_target: bool
    """recall >= the configured min_recall."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def choose_kind(num_vectors: int, config: IndexConfig) -> str:
    """The index kind for a collection of `num_vectors` (config.kind unless it is "auto")."""
    if config.kind != "auto":
        return config.kind
    if num_vectors <= config.flat_max_vectors:
        return "flat"
    return "hnsw" if num_vectors < config.ivf_min_vectors else "ivf"


def build_index(kind: str, dim: int, config: IndexConfig, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
    """A fresh index of `kind` holding `vectors` [n, dim] under `ids` [n]."""
    index = INDEX_TYPES[kind](dim, config)
    if ids.size:
        index.add(ids, vectors)
    return index


def measure_recall(
    index: VectorIndex, ids: np.ndarray, vectors: np.ndarray, query_rows: np.ndarray, k: int
) -> float:
    """recall@k of `index` against exact search over (`ids`, `vectors`) for the rows `query_rows`.

    Each query is an indexed vector, so both result lists drop the query's own id (it would be a free
    hit and make recall look better than on unseen queries). A returned vector counts as a true
    neighbour when its exact score reaches the exact k-th score (within 1e-5): among tied vectors any
    choice is correct, whichever way each index breaks ties.
    """
    k = min(k, ids.size - 1)
    if k < 1:
        return 1.0
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    queries = np.ascontiguousarray(vectors[query_rows], dtype=np.float32)  # [num_queries, dim]
    exact_scores, exact_rows = exact.search(queries, k + 1)  # [num_queries, k + 1]
    _, approx_ids = index.search(queries, k + 1)  # [num_queries, k + 1] ids, -1 padded
    row_of = {int(i): row for row, i in enumerate(ids)}
    num_hits = 0
    for q, query_row in enumerate(query_rows):
        others = exact_scores[q][exact_rows[q] != query_row]
        kth_score = others[k - 1]
        rows = [row_of[int(i)] for i in approx_ids[q] if int(i) in row_of and row_of[int(i)] != query_row][:k]
        num_hits += int(np.sum(vectors[rows] @ queries[q] >= kth_score - 1e-5))
    return num_hits / (k * queries.shape[0])


def calibrate(index: VectorIndex, config: IndexConfig) -> RecallReport:
    """Measure recall@k of `index` and raise its search knob until it meets `config.min_recall`.

    Mutates the index's knob: it keeps the first value that meets the target, or the largest tried.
    An exact index reports recall 1.0 without measuring.
    """
    num_vectors = index.num_vectors
    k = min(config.recall_k, max(1, num_vectors))
    if not index.knob_candidates() or num_vectors == 0:
        return RecallReport(index.kind, 1.0, k, 0, num_vectors, None, None, True)
    ids, vectors = index.export()
    rng = np.random.default_rng(config.seed)
    query_rows = rng.choice(ids.size, size=min(config.num_recall_queries, ids.size), replace=False)
    recall, value = 0.0, 0
    for value in index.knob_candidates():
        index.set_knob(value)
        recall = measure_recall(index, ids, vectors, query_rows, k)
        if recall >= config.min_recall:
            break
    return RecallReport(
        index.kind, recall, k, int(query_rows.size), num_vectors, index.knob_name, value,
        recall >= config.min_recall,
    )
