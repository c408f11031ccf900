"""Vector indexes on faiss: exact (flat), HNSW and IVF behind one interface, keyed by chunk id.

Every index maps int64 chunk ids to vectors and searches by inner product (cosine for normalized
embeddings). The approximate kinds expose one search knob (HNSW efSearch, IVF nprobe) that
`calibration.calibrate` raises until recall against exact search meets the configured floor.
A search restricted to `allowed_ids` (a document filter) is always exact over those vectors: a
filter usually keeps few vectors, where a graph or cell walk would miss most of them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import faiss as _faiss
import numpy as np

from terse.errors import UnsupportedOperationError
from terse.retrieval.config import IndexConfig

# faiss' bundled SWIG stubs omit the numpy overloads (add_with_ids(x, ids), remove_ids(array),
# search(..., params=)) that faiss installs at import time; this module talks to faiss untyped.
faiss: Any = _faiss

_FAISS_FILE = "vectors.faiss"
_TOMBSTONE_FILE = "vectors.tombstones.npy"
_IDS_FILE = "vectors.ids.npy"


class VectorIndex(ABC):
    """Inner-product search over vectors keyed by int64 ids.

    Contract: `add` takes ids greater than every id added before (the retriever allocates them in
    increasing order); `remove` takes present ids; `search` returns
    ([num_queries, k] float32 scores, [num_queries, k] int64 ids) sorted best first, padded with
    id -1 / score -inf when fewer than k live vectors qualify; removed ids never come back.
    """

    kind: ClassVar[str]

    def __init__(self, dim: int, config: IndexConfig) -> None:
        self.dim = dim
        self.config = config

    @property
    @abstractmethod
    def num_vectors(self) -> int:
        """Live (searchable) vectors."""

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Index `vectors` [n, dim] float32 under `ids` [n] int64."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None:
        """Drop the vectors of `ids` [n] int64."""

    @abstractmethod
    def ids(self) -> np.ndarray:
        """[num_vectors] int64 ids of the live vectors."""

    @abstractmethod
    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """[n, dim] float32 stored vectors of live `ids` [n]."""

    @abstractmethod
    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """All live vectors: ([num_vectors] int64 ids, [num_vectors, dim] float32 vectors)."""

    @abstractmethod
    def _search_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Unfiltered search over the live vectors."""

    @abstractmethod
    def write(self, directory: Path) -> list[str]:
        """Write the index under `directory`; returns the file names written."""

    @classmethod
    @abstractmethod
    def read(cls, directory: Path, dim: int, config: IndexConfig, state: dict[str, Any]) -> VectorIndex:
        """Inverse of `write`, given the `state()` saved beside it."""

    def state(self) -> dict[str, Any]:
        """JSON-ready parameters needed to read the index back (kind, search knob)."""
        return {"kind": self.kind}

    def needs_rebuild(self) -> bool:
        """True when the structure has degraded (too many tombstones, outgrown training) and should be
        rebuilt from `export()`; exact search never degrades."""
        return False

    # The search knob: efSearch (HNSW), nprobe (IVF); exact search has none.
    knob_name: ClassVar[str | None] = None

    def knob_candidates(self) -> list[int]:
        """Knob values to try, cheapest first; [] when search is exact."""
        return []

    def set_knob(self, value: int) -> None:
        """Set the search knob (only for approximate kinds)."""
        raise UnsupportedOperationError(
            f"a {self.kind} index searches exactly and has no search knob; use an 'hnsw' or 'ivf' index"
        )

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for `queries` [num_queries, dim]; only `allowed_ids` if given."""
        if allowed_ids is None:
            return self._search_all(queries, k)
        return self._search_subset(queries, k, allowed_ids)

    def _search_subset(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        num_queries = queries.shape[0]
        out_scores = np.full((num_queries, k), -np.inf, dtype=np.float32)
        out_ids = np.full((num_queries, k), -1, dtype=np.int64)
        if allowed_ids.size == 0:
            return out_scores, out_ids
        vectors = self.reconstruct(allowed_ids)  # [num_allowed, dim]
        scores = queries @ vectors.T  # [num_queries, num_allowed]
        num_top = min(k, allowed_ids.size)
        top = np.argpartition(-scores, num_top - 1, axis=1)[:, :num_top]
        for row in range(num_queries):
            order = top[row][np.argsort(-scores[row, top[row]], kind="stable")]
            out_scores[row, :num_top] = scores[row, order]
            out_ids[row, :num_top] = allowed_ids[order]
        return out_scores, out_ids


class _PositionalIndex(VectorIndex):
    """Shared plumbing for flat and HNSW: faiss stores vectors by position, `position_ids` maps each
    position to its id (ascending, since ids are added in increasing order).

    The mapping lives in numpy rather than in faiss.IndexIDMap because IndexIDMap translates labels in
    an OpenMP loop even for one query, and on a busy machine that parallel region alone costs tens of
    milliseconds while the search itself takes tens of microseconds.
    """

    def __init__(self, dim: int, config: IndexConfig, inner: Any = None, position_ids: Any = None) -> None:
        super().__init__(dim, config)
        self.inner = inner if inner is not None else self._make_inner()
        self.position_ids = (
            np.zeros(0, dtype=np.int64) if position_ids is None else position_ids
        )  # [num_stored] int64

    @abstractmethod
    def _make_inner(self) -> Any: ...

    @property
    def num_vectors(self) -> int:
        return int(self.inner.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = ids.astype(np.int64)
        assert np.all(np.diff(ids) > 0) and (
            self.position_ids.size == 0 or ids.size == 0 or ids[0] > self.position_ids[-1]
        ), "ids must be added in increasing order"
        self.inner.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.position_ids = np.concatenate([self.position_ids, ids])

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        positions = np.searchsorted(self.position_ids, ids)
        assert np.all(self.position_ids[np.minimum(positions, self.position_ids.size - 1)] == ids), "unknown id"
        return positions.astype(np.int64)

    def ids(self) -> np.ndarray:
        return self.position_ids[self._live_mask()]

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        if ids.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self.inner.reconstruct_batch(self._positions(ids)), dtype=np.float32)

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        num_stored = int(self.inner.ntotal)
        if num_stored == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.inner.reconstruct_n(0, num_stored)  # [num_stored, dim]
        keep = self._live_mask()
        return self.position_ids[keep], np.ascontiguousarray(vectors[keep], dtype=np.float32)

    def _live_mask(self) -> np.ndarray:
        return np.ones(self.position_ids.shape[0], dtype=bool)

    def _to_ids(self, scores: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = positions >= 0
        ids = np.where(found, self.position_ids[np.where(found, positions, 0)], -1)
        return np.where(found, scores, -np.inf).astype(np.float32), ids.astype(np.int64)

    def write(self, directory: Path) -> list[str]:
        faiss.write_index(self.inner, str(directory / _FAISS_FILE))
        np.save(directory / _IDS_FILE, self.position_ids)
        return [_FAISS_FILE, _IDS_FILE]

    @classmethod
    def _read_parts(cls, directory: Path) -> tuple[Any, np.ndarray]:
        position_ids = np.load(directory / _IDS_FILE, allow_pickle=False).astype(np.int64)
        return faiss.read_index(str(directory / _FAISS_FILE)), position_ids


class FlatIndex(_PositionalIndex):
    """Exact search (faiss IndexFlatIP): recall 1 by construction, cost linear in the collection."""

    kind = "flat"

    def _make_inner(self) -> Any:
        return faiss.IndexFlatIP(self.dim)

    def remove(self, ids: np.ndarray) -> None:
        positions = self._positions(ids.astype(np.int64))
        self.inner.remove_ids(positions)  # IndexFlat compacts, keeping the order of the rest
        self.position_ids = np.delete(self.position_ids, positions)

    def _search_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, positions = self.inner.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return self._to_ids(scores, positions)

    @classmethod
    def read(cls, directory: Path, dim: int, config: IndexConfig, state: dict[str, Any]) -> VectorIndex:
        return cls(dim, config, *cls._read_parts(directory))


class HNSWIndex(_PositionalIndex):
    """Graph search (faiss IndexHNSWFlat). HNSW cannot delete: removed ids become tombstones masked at
    search time; the owner rebuilds the graph once `needs_rebuild()` says they are too many."""

    kind = "hnsw"
    knob_name = "ef_search"

    def __init__(self, dim: int, config: IndexConfig, inner: Any = None, position_ids: Any = None) -> None:
        super().__init__(dim, config, inner, position_ids)
        self.ef_search = config.hnsw_ef_search
        self.tombstones: set[int] = set()
        self._selector: Any = None  # faiss selector over the tombstones; kept alive with the params

    def _make_inner(self) -> Any:
        inner = faiss.IndexHNSWFlat(self.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = self.config.hnsw_ef_construction
        return inner

    @property
    def num_vectors(self) -> int:
        return int(self.inner.ntotal) - len(self.tombstones)

    def _live_mask(self) -> np.ndarray:
        if not self.tombstones:
            return np.ones(self.position_ids.shape[0], dtype=bool)
        return ~np.isin(self.position_ids, np.fromiter(self.tombstones, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        self._positions(ids.astype(np.int64))  # checks they exist
        self.tombstones.update(int(i) for i in ids)
        self._selector = None

    def needs_rebuild(self) -> bool:
        """True when tombstones exceed `max_tombstone_fraction` of the stored vectors."""
        return len(self.tombstones) > self.config.max_tombstone_fraction * max(1, int(self.inner.ntotal))

    def knob_candidates(self) -> list[int]:
        return [self.config.hnsw_ef_search * 2**i for i in range(6)]

    def set_knob(self, value: int) -> None:
        self.ef_search = value

    def _search_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.ef_search, k)
        if self.tombstones:
            if self._selector is None:
                dead = self._positions(np.fromiter(sorted(self.tombstones), dtype=np.int64))
                batch = faiss.IDSelectorBatch(dead)
                self._selector = (batch, faiss.IDSelectorNot(batch))
            params.sel = self._selector[1]
        scores, positions = self.inner.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return self._to_ids(scores, positions)

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "ef_search": self.ef_search}

    def write(self, directory: Path) -> list[str]:
        files = super().write(directory)
        np.save(directory / _TOMBSTONE_FILE, np.array(sorted(self.tombstones), dtype=np.int64))
        return [*files, _TOMBSTONE_FILE]

    @classmethod
    def read(cls, directory: Path, dim: int, config: IndexConfig, state: dict[str, Any]) -> VectorIndex:
        index = cls(dim, config, *cls._read_parts(directory))
        index.ef_search = int(state["ef_search"])
        index.tombstones = {int(i) for i in np.load(directory / _TOMBSTONE_FILE, allow_pickle=False)}
        return index


class IVFIndex(VectorIndex):
    """Inverted-file search (faiss IndexIVFFlat): k-means cells, `nprobe` visited per query. Trained on
    the vectors of its first `add`; the owner retrains once the collection outgrows `needs_rebuild()`."""

    kind = "ivf"
    knob_name = "nprobe"

    def __init__(self, dim: int, config: IndexConfig, index: Any = None) -> None:
        super().__init__(dim, config)
        self.index: Any = index
        self.nprobe = config.ivf_nprobe
        self.num_trained = 0 if index is None else int(index.ntotal)

    @property
    def num_vectors(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _train(self, vectors: np.ndarray) -> Any:
        num_vectors = vectors.shape[0]
        # faiss wants >= 39 training points per cell; 4 x sqrt(n) cells is the usual rule of thumb.
        nlist = self.config.ivf_nlist or int(4 * math.sqrt(num_vectors))
        nlist = max(1, min(nlist, num_vectors // 39))
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(self.config.seed)
        sample = vectors[rng.permutation(num_vectors)[: 256 * nlist]]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.own_fields = True
        quantizer.this.disown()  # the IVF index owns its quantizer from here on
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct + remove by id
        self.num_trained = num_vectors
        return index

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self.index is None:
            self.index = self._train(vectors)
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if self.index is not None:
            self.index.remove_ids(ids.astype(np.int64))

    def needs_rebuild(self) -> bool:
        """True when the collection grew past 4x the vectors the cells were trained on."""
        return self.num_vectors > 4 * max(1, self.num_trained)

    def ids(self) -> np.ndarray:
        return self.export()[0]

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None or self.index.ntotal == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        lists = self.index.invlists
        id_parts: list[np.ndarray] = []
        vector_parts: list[np.ndarray] = []
        for cell in range(self.index.nlist):
            size = lists.list_size(cell)
            if size:
                # IVFFlat stores each vector's float32 values verbatim as its code.
                codes = faiss.rev_swig_ptr(lists.get_codes(cell), size * lists.code_size)
                id_parts.append(faiss.rev_swig_ptr(lists.get_ids(cell), size).copy())
                vector_parts.append(np.frombuffer(codes.tobytes(), dtype=np.float32).reshape(size, self.dim))
        return np.concatenate(id_parts).astype(np.int64), np.concatenate(vector_parts)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        if self.index is None or ids.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.index.reconstruct(int(i)) for i in ids])

    def knob_candidates(self) -> list[int]:
        nlist = 1 if self.index is None else int(self.index.nlist)
        values = {min(self.config.ivf_nprobe * 2**i, nlist) for i in range(12)}
        return sorted(values)

    def set_knob(self, value: int) -> None:
        self.nprobe = value

    def _search_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            return self._search_subset(queries, k, np.zeros(0, dtype=np.int64))
        params = faiss.SearchParametersIVF()
        params.nprobe = min(self.nprobe, int(self.index.nlist))
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return scores, ids

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "nprobe": self.nprobe, "num_trained": self.num_trained}

    def write(self, directory: Path) -> list[str]:
        assert self.index is not None, "an IVF index is written only after its first add"
        faiss.write_index(self.index, str(directory / _FAISS_FILE))
        return [_FAISS_FILE]

    @classmethod
    def read(cls, directory: Path, dim: int, config: IndexConfig, state: dict[str, Any]) -> VectorIndex:
        index = cls(dim, config, faiss.read_index(str(directory / _FAISS_FILE)))
        index.nprobe = int(state["nprobe"])
        index.num_trained = int(state["num_trained"])
        return index


INDEX_TYPES: dict[str, type[VectorIndex]] = {cls.kind: cls for cls in (FlatIndex, HNSWIndex, IVFIndex)}
"""kind -> class: the registry the retriever builds and reads indexes through."""
