"""Value types of terse.retrieval: documents in, chunks stored, hits out.

All are frozen dataclasses. Character offsets are exact: `document.text[chunk.char_start:chunk.char_end]`
equals `chunk.text`, so a hit can always be traced back to (and highlighted in) its source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from terse.errors import InvalidRequestError

SearchMode = Literal["dense", "bm25", "hybrid"]
"""dense: embedding cosine/inner product; bm25: lexical; hybrid: both fused by reciprocal rank."""

SEARCH_MODES: tuple[SearchMode, ...] = ("dense", "bm25", "hybrid")


@dataclass(frozen=True)
class Document:
    """One source document. `id` is unique within an index; re-adding an id with new text replaces it."""

    id: str
    """Stable identifier (a relative path for files, the `id` field for JSONL lines)."""
    text: str
    """Full text; chunk offsets index into it."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """JSON-serializable extra fields (source path, title, ...), stored with the document."""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InvalidRequestError(f"Document id={self.id!r} must be a non-empty string")
        if not isinstance(self.text, str):
            raise InvalidRequestError(
                f"Document {self.id!r}: text must be str, got {type(self.text).__name__}"
            )

    @property
    def content_hash(self) -> str:
        """sha256 of the UTF-8 text: an unchanged document is skipped when re-added."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """A contiguous span of one document, sized to the embedder's token budget."""

    doc_id: str
    """Id of the document the chunk was cut from."""
    chunk_index: int
    """Position of the chunk within its document (0-based)."""
    char_start: int
    """Offset of the first character in `Document.text`."""
    char_end: int
    """Offset one past the last character: `doc.text[char_start:char_end] == text`."""
    text: str
    """The chunk's text."""
    num_tokens: int
    """Length in the embedder tokenizer's tokens (no special tokens, no prompt)."""


@dataclass(frozen=True)
class Hit:
    """One search result. Ranks are 1-based positions in each mode's own ranking (None: not ranked)."""

    chunk_id: int
    """Id of the chunk in the index (stable across saves, never reused after a delete)."""
    doc_id: str
    """Id of the document the chunk belongs to."""
    chunk_index: int
    """Position of the chunk within its document."""
    text: str
    """The chunk's text."""
    char_start: int
    """Offset of the chunk's first character in its document."""
    char_end: int
    """Offset one past the chunk's last character."""
    score: float
    """Score in the requested mode: inner product (dense), BM25 score, or fused RRF score (hybrid)."""
    dense_rank: int | None
    """1-based rank in the dense candidate list, None if absent or not searched."""
    bm25_rank: int | None
    """1-based rank in the BM25 candidate list, None if absent or not searched."""


@dataclass(frozen=True)
class AddReport:
    """What `Retriever.add_documents` did."""

    num_added: int
    """Documents new to the index."""
    num_updated: int
    """Documents whose content hash changed: old chunks deleted, new ones embedded."""
    num_unchanged: int
    """Documents whose content hash matched the stored one: nothing re-embedded."""
    num_chunks_added: int
    """Chunks embedded and indexed by this call."""
    num_chunks_removed: int
    """Chunks removed because their document changed (or, see below, is gone)."""
    removed_doc_ids: tuple[str, ...] = ()
    """Documents deleted because their file (or JSONL line) is gone (`add_paths(remove_missing=True)`)."""
