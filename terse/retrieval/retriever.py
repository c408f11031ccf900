"""`Retriever`: documents in, ranked chunks out; dense, BM25 or hybrid; saved and reopened as a directory.

    add_documents --chunk--> Chunker --texts--> Embedder --vectors--> VectorIndex (faiss)
                                 \\--------------------------------> ChunkStore (SQLite) --> BM25Index
    search --dense--> VectorIndex.search \\
           --bm25---> BM25Index.search    >--hybrid: reciprocal_rank_fusion--> [Hit]

Updates are incremental: a document whose content hash is unchanged is skipped, a changed one has its
old chunks removed and only its new chunks embedded. The BM25 index is rebuilt lazily from the store.

Concurrent writers: hold `IndexLock(path)` from `open` to `save` (as `terse index` does); `save`
itself takes the lock, and refuses to publish over a version another writer saved after this
retriever opened (or last saved) that index, so an update is never silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from terse.errors import ConfigError, InvalidRequestError, RetrievalIndexError, TerseError
from terse.retrieval.bm25 import BM25Index
from terse.retrieval.calibration import RecallReport, build_index, calibrate, choose_kind
from terse.retrieval.chunker import Chunker
from terse.retrieval.config import RetrieverConfig
from terse.retrieval.embedder import Embedder, ProgressFn, SentenceTransformerEmbedder
from terse.retrieval.fusion import reciprocal_rank_fusion
from terse.retrieval.loaders import load_documents
from terse.retrieval.persistence import current_version, read_version, write_version
from terse.retrieval.store import ChunkStore
from terse.retrieval.sync import plan_sync
from terse.retrieval.types import SEARCH_MODES, AddReport, Chunk, Document, Hit, SearchMode
from terse.retrieval.vector_index import INDEX_TYPES, VectorIndex

_CHUNKS_FILE = "chunks.sqlite"
_BM25_DIR = "bm25"


@dataclass(frozen=True)
class RetrieverStats:
    """A snapshot of what an index holds."""

    num_documents: int
    """Documents indexed (including empty ones, which have no chunks)."""
    num_chunks: int
    """Chunks searchable."""
    dim: int | None
    """Embedding dimension (None before the first chunk is embedded)."""
    index_kind: str | None
    """flat, hnsw or ivf (None before the first chunk)."""
    embedder: dict[str, Any]
    """The embedder signature the index was built with."""
    recall: RecallReport | None
    """Last recall measurement against exact search (recall 1.0 for flat; a rejected ANN attempt keeps
    the flat index and its failed report here)."""


class Retriever:
    """Chunk, embed, index and search documents. Not thread-safe: one writer, no concurrent searches."""

    def __init__(self, config: RetrieverConfig | None = None, *, embedder: Embedder | None = None) -> None:
        self.config = config or RetrieverConfig()
        self.embedder: Embedder = embedder or SentenceTransformerEmbedder(self.config.embedder)
        self.store = ChunkStore()
        self.vectors: VectorIndex | None = None
        self.recall: RecallReport | None = None
        self._bm25: BM25Index | None = None
        self._chunker: Chunker | None = None
        self._ann_retry_at = 0  # auto: collection size at which a rejected ANN switch is tried again
        self._num_calibrated = 0
        self._based_on: tuple[str, str] | None = None  # (resolved index dir, version) read or last saved

    # ---- building -------------------------------------------------------------------------------

    @property
    def chunker(self) -> Chunker:
        """The chunker, counting in the embedder's tokenizer (budget checked against its window)."""
        if self._chunker is None:
            limit = self.embedder.max_document_tokens
            if self.config.chunker.chunk_tokens > limit:
                raise ConfigError(
                    f"chunk_tokens={self.config.chunker.chunk_tokens} exceeds what the embedder reads "
                    f"({limit} tokens after special tokens and prompt); use chunk_tokens <= {limit}"
                )
            self._chunker = Chunker(self.config.chunker, self.embedder)
        return self._chunker

    def add_paths(
        self, paths: Sequence[str | Path], progress: ProgressFn | None = None, *, remove_missing: bool = False
    ) -> AddReport:
        """Read .txt/.md/.jsonl/.pdf files (directories recursively) and add them; see add_documents.

        A file indexed before under another spelling of its path keeps its document id (one file, one
        document; see sync.py). With `remove_missing`, documents read before from under `paths` whose
        file (or JSONL line) is gone are deleted too (`AddReport.removed_doc_ids`), so the index
        mirrors what the paths hold now.
        """
        plan = plan_sync(paths, load_documents(paths), self.store.sources())
        gone = plan.gone_ids if remove_missing else []
        if not plan.documents and not gone:
            raise InvalidRequestError(
                f"no .txt, .md, .jsonl or .pdf documents found under {[str(p) for p in paths]}"
            )
        report = self.add_documents(plan.documents, progress) if plan.documents else AddReport(0, 0, 0, 0, 0)
        if gone:
            num_chunks = self.delete(gone)
            report = dataclasses.replace(
                report, num_chunks_removed=report.num_chunks_removed + num_chunks, removed_doc_ids=tuple(gone)
            )
        return report

    def add_documents(self, documents: Iterable[Document], progress: ProgressFn | None = None) -> AddReport:
        """Add or replace documents; unchanged ones (same content hash) are skipped, not re-embedded.

        Embedding happens before anything is mutated, so a failure leaves the index as it was.
        `progress(num_done, num_total)` is called as chunks are embedded.
        """
        docs = list(documents)
        if not docs:
            raise InvalidRequestError("add_documents() got no documents; pass at least one Document")
        seen: set[str] = set()
        for doc in docs:
            if doc.id in seen:
                raise InvalidRequestError(f"document id {doc.id!r} appears twice in one call; ids are unique")
            seen.add(doc.id)
        changed = [d for d in docs if self.store.content_hash(d.id) != d.content_hash]
        num_updated = sum(1 for d in changed if self.store.content_hash(d.id) is not None)
        chunks = {d.id: self.chunker.chunk(d) for d in changed}
        texts = [c.text for d in changed for c in chunks[d.id]]
        if not texts and num_updated == 0 and changed and self.store.num_chunks == 0:
            raise InvalidRequestError(
                f"the {len(changed)} document(s) given contain no text (e.g. {changed[0].id!r}); "
                f"nothing to index"
            )
        vectors = self.embedder.embed_documents(texts, progress) if texts else None  # [num_texts, dim]
        num_removed = self._apply(changed, chunks, vectors)
        return AddReport(len(changed) - num_updated, num_updated, len(docs) - len(changed), len(texts), num_removed)

    def _apply(self, changed: list[Document], chunks: dict[str, list[Chunk]], vectors: np.ndarray | None) -> int:
        if vectors is not None and self.vectors is not None and vectors.shape[1] != self.vectors.dim:
            raise RetrievalIndexError(
                f"embedder returns {vectors.shape[1]}-dim vectors, the index holds {self.vectors.dim}-dim "
                f"ones; use the embedder the index was built with"
            )
        removed: list[int] = []
        for doc in changed:
            if self.store.content_hash(doc.id) is not None:
                removed.extend(self.store.delete_document(doc.id))
        new_ids: list[int] = []
        for doc in changed:
            new_ids.extend(self.store.put_document(doc, chunks[doc.id]))
        if removed and self.vectors is not None:
            self.vectors.remove(np.asarray(removed, dtype=np.int64))
        if vectors is not None:
            if self.vectors is None:
                # auto starts exact; _maintain_vector_index switches once an ANN index proves its recall
                kind = "flat" if self.config.index.kind == "auto" else self.config.index.kind
                self.vectors = INDEX_TYPES[kind](int(vectors.shape[1]), self.config.index)
            self.vectors.add(np.asarray(new_ids, dtype=np.int64), vectors)
        self._bm25 = None
        self._maintain_vector_index()
        return len(removed)

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents and their chunks; returns the number of chunks removed."""
        ids = list(doc_ids)
        self._check_known(ids)
        removed = [c for doc_id in ids for c in self.store.delete_document(doc_id)]
        if removed and self.vectors is not None:
            self.vectors.remove(np.asarray(removed, dtype=np.int64))
        self._bm25 = None
        self._maintain_vector_index()
        return len(removed)

    def _maintain_vector_index(self) -> None:
        """Switch kind as the collection grows (auto), rebuild degraded structures, recalibrate."""
        if self.vectors is None:
            return
        num_vectors = self.vectors.num_vectors
        target = choose_kind(num_vectors, self.config.index)
        auto = self.config.index.kind == "auto"
        if target != self.vectors.kind and not (auto and target != "flat" and num_vectors < self._ann_retry_at):
            ids, vectors = self.vectors.export()
            candidate = build_index(target, self.vectors.dim, self.config.index, ids, vectors)
            report = calibrate(candidate, self.config.index)
            self.recall, self._num_calibrated = report, num_vectors
            if report.meets_target or not auto or target == "flat":
                self.vectors = candidate
            else:  # keep exact search; try again once the collection has doubled
                self._ann_retry_at = 2 * num_vectors
        elif self.vectors.needs_rebuild():
            ids, vectors = self.vectors.export()
            self.vectors = build_index(self.vectors.kind, self.vectors.dim, self.config.index, ids, vectors)
            self.recall, self._num_calibrated = calibrate(self.vectors, self.config.index), num_vectors
        elif self.recall is None or abs(num_vectors - self._num_calibrated) > 0.25 * self._num_calibrated:
            self.recall, self._num_calibrated = calibrate(self.vectors, self.config.index), num_vectors

    # ---- searching ------------------------------------------------------------------------------

    def search(
        self, query: str, k: int = 5, mode: SearchMode = "hybrid", doc_ids: Sequence[str] | None = None
    ) -> list[Hit]:
        """The top-`k` chunks for `query`, best first; only chunks of `doc_ids` when given."""
        return self.search_batch([query], k, mode, doc_ids)[0]

    def search_batch(
        self,
        queries: Sequence[str],
        k: int = 5,
        mode: SearchMode = "hybrid",
        doc_ids: Sequence[str] | None = None,
    ) -> list[list[Hit]]:
        """`search` for many queries at once (queries embedded in batches): one hit list per query."""
        for query in queries:
            if not isinstance(query, str) or not query.strip():
                raise InvalidRequestError(f"query={query!r} must be a non-empty string")
        if not isinstance(k, int) or k < 1:
            raise InvalidRequestError(f"k={k!r} must be an int >= 1")
        if mode not in SEARCH_MODES:
            raise InvalidRequestError(f"mode={mode!r} must be one of {SEARCH_MODES}")
        if self.vectors is None or self.vectors.num_vectors == 0:  # vectors and chunks are 1:1
            raise RetrievalIndexError("the index holds no chunks; add documents before searching")
        allowed: list[int] | None = None
        if doc_ids is not None:
            self._check_known(list(doc_ids))
            allowed = self.store.chunk_ids_of(doc_ids)
        depth = k if mode != "hybrid" else max(k, self.config.candidate_k)
        dense = self._dense(queries, depth, allowed) if mode != "bm25" else None
        results = []
        for i, query in enumerate(queries):
            lexical = self._lexical(query, depth, allowed) if mode != "dense" else None
            ranked: list[tuple[int, float, tuple[int | None, int | None]]]
            if dense is None:
                assert lexical is not None
                ranked = [(c, s, (None, r)) for r, (c, s) in enumerate(zip(*lexical), start=1)]
            elif lexical is None:
                ranked = [(c, s, (r, None)) for r, (c, s) in enumerate(zip(*dense[i]), start=1)]
            else:
                fused = reciprocal_rank_fusion([dense[i][0], lexical[0]], self.config.rrf_k)
                ranked = [(f.item_id, f.score, (f.ranks[0], f.ranks[1])) for f in fused]
            results.append(self._hits(ranked[:k]))
        return results

    def _dense(
        self, queries: Sequence[str], depth: int, allowed: list[int] | None
    ) -> list[tuple[list[int], list[float]]]:
        assert self.vectors is not None
        query_vectors = self.embedder.embed_queries(queries)  # [num_queries, dim]
        if query_vectors.shape[1] != self.vectors.dim:
            raise RetrievalIndexError(
                f"embedder returns {query_vectors.shape[1]}-dim vectors, the index holds "
                f"{self.vectors.dim}-dim ones; open the index with the embedder it was built with"
            )
        allowed_ids = None if allowed is None else np.asarray(allowed, dtype=np.int64)
        scores, ids = self.vectors.search(query_vectors, depth, allowed_ids)  # [num_queries, depth] each
        keep = ids >= 0
        return [
            ([int(c) for c in ids[row][keep[row]]], [float(s) for s in scores[row][keep[row]]])
            for row in range(ids.shape[0])
        ]

    def _lexical(self, query: str, depth: int, allowed: list[int] | None) -> tuple[list[int], list[float]]:
        if self._bm25 is None:
            self._bm25 = BM25Index.build(*self.store.all_texts())
        scores, ids = self._bm25.search(query, depth, allowed)
        return [int(i) for i in ids], [float(s) for s in scores]

    def _hits(self, ranked: list[tuple[int, float, tuple[int | None, int | None]]]) -> list[Hit]:
        rows = self.store.chunks([chunk_id for chunk_id, _, _ in ranked])
        hits = []
        for chunk_id, score, (dense_rank, bm25_rank) in ranked:
            _, doc_id, chunk_index, start, end, text = rows[chunk_id]
            hits.append(Hit(chunk_id, doc_id, chunk_index, text, start, end, score, dense_rank, bm25_rank))
        return hits

    def _check_known(self, doc_ids: list[str]) -> None:
        unknown = [d for d in doc_ids if self.store.content_hash(d) is None]
        if unknown:
            raise InvalidRequestError(
                f"unknown document id(s) {unknown[:5]!r}; the index holds {self.store.num_documents} "
                f"documents (see Retriever.doc_ids())"
            )

    def doc_ids(self) -> list[str]:
        """Ids of the indexed documents, sorted."""
        return self.store.doc_ids()

    def stats(self) -> RetrieverStats:
        """Counts, index kind and the last recall measurement."""
        return RetrieverStats(
            self.store.num_documents,
            self.store.num_chunks,
            None if self.vectors is None else self.vectors.dim,
            None if self.vectors is None else self.vectors.kind,
            self.embedder.signature(),
            self.recall,
        )

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the index to directory `path` atomically (see persistence.py); returns `path`.

        An approximate index whose last recall measurement predates changes is re-measured first, so
        the manifest records the recall of exactly what is saved. Saving to the directory this
        retriever was opened from (or last saved to) raises RetrievalIndexError if another writer
        published there since: its changes would be dropped (hold `IndexLock` from open to save).
        """
        root = Path(path)
        if self.vectors is not None and self.recall is not None and self.recall.kind == self.vectors.kind and (
            self.recall.num_vectors != self.vectors.num_vectors
        ):
            self.recall, self._num_calibrated = calibrate(self.vectors, self.config.index), self.vectors.num_vectors
        if self._bm25 is None and self.store.num_chunks:
            self._bm25 = BM25Index.build(*self.store.all_texts())
        key = str(root.resolve())
        expect = self._based_on[1] if self._based_on is not None and self._based_on[0] == key else None
        version_dir = write_version(root, self._write_files, expect_current=expect)
        self._based_on = (key, version_dir.name)
        return root

    def _write_files(self, directory: Path) -> dict[str, Any]:
        self.store.save(directory / _CHUNKS_FILE)
        if self.vectors is not None and self.vectors.num_vectors:
            self.vectors.write(directory)
        if self._bm25 is not None:
            self._bm25.write(directory / _BM25_DIR)
        return {
            "embedder": self.embedder.signature(),
            "dim": None if self.vectors is None else self.vectors.dim,
            "config": self.config.to_json(),
            "vector_index": None if self.vectors is None or not self.vectors.num_vectors else self.vectors.state(),
            "recall": None if self.recall is None else self.recall.to_json(),
            "num_documents": self.store.num_documents,
            "num_chunks": self.store.num_chunks,
            "ann_retry_at": self._ann_retry_at,
            "num_calibrated": self._num_calibrated,
        }

    @classmethod
    def open(cls, path: str | Path, *, embedder: Embedder | None = None, verify: bool = True) -> Retriever:
        """Reopen a saved index without re-embedding.

        Without `embedder`, the one recorded in the manifest is built (loaded on first query). A given
        embedder must have the recorded signature; a missing/corrupt file or a mismatch raises
        RetrievalIndexError. `verify` checks every file's sha256 (reads each file once). A version
        pruned by a concurrent writer while it was being read is retried on the newly published one.
        """
        root = Path(path)
        for attempt in range(3):
            seen = current_version(root)
            try:
                return cls._open_version(root, embedder, verify)
            except RetrievalIndexError:
                if attempt == 2 or current_version(root) == seen:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _open_version(cls, root: Path, embedder: Embedder | None, verify: bool) -> Retriever:
        version_dir, manifest = read_version(root, verify=verify)
        try:
            config = RetrieverConfig.from_json(manifest["config"])
            retriever = cls(config, embedder=embedder)
            _check_signature(root, manifest["embedder"], retriever.embedder.signature())
            retriever.store = ChunkStore.load(version_dir / _CHUNKS_FILE)
            retriever._read_indexes(version_dir, manifest)
            retriever._ann_retry_at = int(manifest["ann_retry_at"])
            retriever._num_calibrated = int(manifest["num_calibrated"])
            retriever.recall = None if manifest["recall"] is None else RecallReport(**manifest["recall"])
        except TerseError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RetrievalIndexError(
                f"index manifest in {str(version_dir)!r} lacks a field or holds a bad value "
                f"({type(e).__name__}: {e}); rebuild the index"
            ) from e
        retriever._based_on = (str(root.resolve()), version_dir.name)
        return retriever

    def _read_indexes(self, version_dir: Path, manifest: dict[str, Any]) -> None:
        state = manifest["vector_index"]
        dim = manifest["dim"]
        try:
            if state is not None:
                self.vectors = INDEX_TYPES[state["kind"]].read(version_dir, int(dim), self.config.index, state)
            elif dim is not None:  # every chunk was deleted: an empty index of the kind a first add picks
                self.vectors = INDEX_TYPES[choose_kind(0, self.config.index)](int(dim), self.config.index)
            if (version_dir / _BM25_DIR).is_dir():
                self._bm25 = BM25Index.read(version_dir / _BM25_DIR)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            raise RetrievalIndexError(f"cannot read the index files in {str(version_dir)!r} ({e}); rebuild") from e
        num_vectors = 0 if self.vectors is None else self.vectors.num_vectors
        if num_vectors != self.store.num_chunks:
            raise RetrievalIndexError(
                f"index in {str(version_dir)!r} holds {num_vectors} vectors for {self.store.num_chunks} chunks; rebuild"
            )


def _check_signature(path: str | Path, recorded: dict[str, Any], given: dict[str, Any]) -> None:
    if recorded != given:
        diff = {k: (recorded.get(k), given.get(k)) for k in set(recorded) | set(given) if recorded.get(k) != given.get(k)}
        raise RetrievalIndexError(
            f"index at {str(path)!r} was built with embedder {recorded}, not {given} (differs in "
            f"{diff}); open it with the recorded embedder settings or rebuild it with the new ones"
        )

