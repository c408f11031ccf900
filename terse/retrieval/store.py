"""The chunk store: documents and chunks in SQLite, held in memory while an index is open.

Saving copies the in-memory database into a new file (sqlite3 backup API) and opening copies a file
into memory, so the files of a saved index are never written again after their version is published
(see persistence.py). Chunk ids are allocated from a counter stored in the database and never reused:
a deleted id may still be a tombstone in an HNSW graph.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from terse.errors import RetrievalIndexError
from terse.retrieval.types import Chunk, Document

_SCHEMA = """
CREATE TABLE documents (
    doc_id TEXT PRIMARY KEY,
    content_hash TEXT NOT NULL,
    num_chars INTEGER NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE chunks (
    chunk_id INTEGER PRIMARY KEY,
    doc_id TEXT NOT NULL REFERENCES documents(doc_id),
    chunk_index INTEGER NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX chunks_by_doc ON chunks(doc_id);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters VALUES ('next_chunk_id', 0);
"""

def _memory_db() -> sqlite3.Connection:
    # Not bound to the creating thread: a Retriever may be built on one thread and used on another
    # (one at a time; the Retriever is not thread-safe).
    return sqlite3.connect(":memory:", check_same_thread=False)


ChunkRow = tuple[int, str, int, int, int, str]
"""(chunk_id, doc_id, chunk_index, char_start, char_end, text)"""


class ChunkStore:
    """Documents (id, content hash, metadata) and their chunks (id, offsets, text)."""

    def __init__(self, connection: sqlite3.Connection | None = None) -> None:
        if connection is None:
            connection = _memory_db()
            connection.executescript(_SCHEMA)
        self.db = connection

    @classmethod
    def load(cls, path: Path) -> ChunkStore:
        """Copy the database file at `path` into memory; a corrupt file raises RetrievalIndexError."""
        source = None
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            memory = _memory_db()
            source.backup(memory)
            check = memory.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise RetrievalIndexError(f"chunk database {str(path)!r} fails its integrity check: {check}")
            memory.execute("SELECT value FROM counters WHERE name = 'next_chunk_id'").fetchone()[0]
        except (sqlite3.Error, TypeError) as e:
            raise RetrievalIndexError(
                f"chunk database {str(path)!r} is corrupt or not a terse index ({e}); rebuild the index"
            ) from e
        finally:
            if source is not None:
                source.close()
        return cls(memory)

    def save(self, path: Path) -> None:
        """Write the whole store to a new database file at `path`."""
        target = sqlite3.connect(path)
        try:
            self.db.backup(target)
        finally:
            target.close()

    @property
    def num_documents(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    @property
    def num_chunks(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])

    def content_hash(self, doc_id: str) -> str | None:
        """Stored content hash of `doc_id`, or None if the document is not indexed."""
        row = self.db.execute("SELECT content_hash FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        return None if row is None else str(row[0])

    def doc_ids(self) -> list[str]:
        return [str(r[0]) for r in self.db.execute("SELECT doc_id FROM documents ORDER BY doc_id")]

    def metadata(self, doc_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT metadata FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        return {} if row is None else dict(json.loads(row[0]))

    def sources(self) -> dict[str, str]:
        """doc id -> `metadata["source"]` of every document that has a string source."""
        rows = self.db.execute("SELECT doc_id, metadata FROM documents").fetchall()
        found = {str(doc_id): json.loads(metadata).get("source") for doc_id, metadata in rows}
        return {doc_id: source for doc_id, source in found.items() if isinstance(source, str)}

    def chunk_ids_of(self, doc_ids: Iterable[str]) -> list[int]:
        """Ids of every chunk of the given documents, ascending."""
        ids: list[int] = []
        for doc_id in doc_ids:
            rows = self.db.execute("SELECT chunk_id FROM chunks WHERE doc_id = ?", (doc_id,))
            ids.extend(int(r[0]) for r in rows)
        return sorted(ids)

    def put_document(self, document: Document, chunks: Sequence[Chunk]) -> list[int]:
        """Insert `document` (which must be absent) and its chunks; returns the new chunk ids."""
        first_id = self._allocate(len(chunks))
        with self.db:
            self.db.execute(
                "INSERT INTO documents VALUES (?, ?, ?, ?)",
                (document.id, document.content_hash, len(document.text), json.dumps(document.metadata)),
            )
            self.db.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (first_id + i, c.doc_id, c.chunk_index, c.char_start, c.char_end, c.num_tokens, c.text)
                    for i, c in enumerate(chunks)
                ],
            )
        return list(range(first_id, first_id + len(chunks)))

    def delete_document(self, doc_id: str) -> list[int]:
        """Remove a document and its chunks; returns the removed chunk ids."""
        chunk_ids = self.chunk_ids_of([doc_id])
        with self.db:
            self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
            self.db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))
        return chunk_ids

    def chunks(self, chunk_ids: Sequence[int]) -> dict[int, ChunkRow]:
        """chunk id -> row for the ids that exist."""
        rows: dict[int, ChunkRow] = {}
        for start in range(0, len(chunk_ids), 500):  # stay under SQLite's bound-parameter limit
            batch = [int(i) for i in chunk_ids[start : start + 500]]
            marks = ",".join("?" * len(batch))
            query = (
                "SELECT chunk_id, doc_id, chunk_index, char_start, char_end, text FROM chunks "
                f"WHERE chunk_id IN ({marks})"
            )
            for row in self.db.execute(query, batch):
                rows[int(row[0])] = (int(row[0]), str(row[1]), int(row[2]), int(row[3]), int(row[4]), str(row[5]))
        return rows

    def all_texts(self) -> tuple[list[int], list[str]]:
        """(chunk ids ascending, their texts): the BM25 corpus."""
        rows = self.db.execute("SELECT chunk_id, text FROM chunks ORDER BY chunk_id").fetchall()
        return [int(r[0]) for r in rows], [str(r[1]) for r in rows]

    def _allocate(self, num_ids: int) -> int:
        with self.db:
            first = int(self.db.execute("SELECT value FROM counters WHERE name = 'next_chunk_id'").fetchone()[0])
            self.db.execute("UPDATE counters SET value = ? WHERE name = 'next_chunk_id'", (first + num_ids,))
        return first
