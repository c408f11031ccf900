"""Which documents a re-read of some paths adds, keeps, renames and removes: `plan_sync`.

An index remembers where each file document came from (`metadata["source"]`, the file's resolved
path). When the same paths are read again:

- a file already indexed under another spelling of its path (`docs/a.txt`, `./docs//a.txt`, the
  absolute path, or `a.txt` inside the folder `docs`) keeps the id it was indexed under: one file is
  one document, however it is named;
- an indexed document whose source lies under the paths read (a file inside a folder read, or a file
  named) but which the read did not produce is gone: its file was deleted or renamed, or its line
  left a JSONL file. Those are listed for removal. Documents from other paths, or added without a
  source, are never touched.

Pure: paths are resolved, nothing is read or written here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from terse.retrieval.types import Document

_MANY_PER_FILE = (".jsonl",)
"""Suffixes of files holding many documents (identified by their own ids, not by the file)."""


@dataclass(frozen=True)
class SyncPlan:
    """What to do with one read of `paths` against what the index holds."""

    documents: list[Document]
    """The documents read, with ids unified to the stored id of the same file where one exists."""
    gone_ids: list[str]
    """Stored documents from under the paths read that the read no longer produced (sorted)."""


def resolve_source(source: str) -> Path:
    """A stored source as an absolute path (sources of older indexes may be relative to the cwd)."""
    return Path(os.path.abspath(source)) if not os.path.isabs(source) else Path(source)


def plan_sync(paths: Sequence[str | Path], documents: Sequence[Document], sources: Mapping[str, str]) -> SyncPlan:
    """Unify ids of re-read files and find stored documents that are gone. See the module docstring.

    `sources` maps stored document ids to their `metadata["source"]` (documents without one are left out).
    """
    stored = {doc_id: resolve_source(src) for doc_id, src in sources.items()}
    by_file: dict[Path, str] = {}
    for doc_id in sorted(stored):  # several ids of one file (indexes older than this rule): keep the first
        if stored[doc_id].suffix.lower() not in _MANY_PER_FILE:
            by_file.setdefault(stored[doc_id], doc_id)
    unified: list[Document] = []
    for doc in documents:
        source = doc.metadata.get("source")
        if isinstance(source, str) and Path(source).suffix.lower() not in _MANY_PER_FILE:
            known = by_file.get(resolve_source(source))
            if known is not None and known != doc.id:
                doc = Document(known, doc.text, doc.metadata)
        unified.append(doc)
    read_ids = {d.id for d in unified}
    roots = [Path(os.path.abspath(p)).resolve() for p in paths]
    gone = sorted(
        doc_id for doc_id, src in stored.items() if doc_id not in read_ids and any(_inside(src, r) for r in roots)
    )
    return SyncPlan(unified, gone)


def _inside(source: Path, root: Path) -> bool:
    return source == root or root in source.parents
