"""Re-reading paths into an index: one file is one document whatever its spelling, and documents
whose files are gone are removed (only those read before from under the paths given)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from terse.retrieval import ChunkerConfig, Document, Retriever, RetrieverConfig
from terse.retrieval.loaders import load_documents
from tests.retrieval.conftest import HashEmbedder


def _retriever() -> Retriever:
    return Retriever(RetrieverConfig(chunker=ChunkerConfig(16, 2)), embedder=HashEmbedder())


def _folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Herons wade in the shallows.", encoding="utf-8")
    (root / "sub" / "b.md").write_text("Otters slide down the bank.", encoding="utf-8")
    (root / "c.jsonl").write_text(
        json.dumps({"id": "q1", "text": "Badgers dig setts."}) + "\n" + json.dumps({"id": "q2", "text": "Voles."}) + "\n",
        encoding="utf-8",
    )
    return root


def test_one_file_is_one_document_whatever_its_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _folder(tmp_path / "docs")
    monkeypatch.chdir(tmp_path)
    spellings = ["docs/a.txt", "./docs/a.txt", "docs//a.txt", "docs/sub/../a.txt", str(docs / "a.txt")]
    assert [d.id for d in load_documents(spellings)] == ["docs/a.txt"]  # read once
    retriever = _retriever()
    assert retriever.add_paths(["docs/a.txt"]).num_added == 1
    for spelling in spellings[1:]:
        report = retriever.add_paths([spelling])
        assert (report.num_added, report.num_unchanged) == (0, 1), spelling
    os.symlink(docs / "a.txt", tmp_path / "link.txt")
    assert retriever.add_paths(["link.txt"]).num_unchanged == 1
    # the folder reads the same file under the id "a.txt": it keeps the id it was indexed under
    report = retriever.add_paths(["docs"])
    assert (report.num_added, report.num_unchanged) == (3, 1)
    assert retriever.doc_ids() == ["docs/a.txt", "q1", "q2", "sub/b.md"]
    (docs / "a.txt").write_text("Herons fly off at dusk.", encoding="utf-8")
    assert retriever.add_paths([str(docs)]).num_updated == 1 and len(retriever.doc_ids()) == 4


def test_documents_whose_files_are_gone_are_removed(tmp_path: Path) -> None:
    docs = _folder(tmp_path / "docs")
    other = tmp_path / "other.txt"
    other.write_text("A separate note about lynxes.", encoding="utf-8")
    retriever = _retriever()
    retriever.add_paths([docs, other])
    retriever.add_documents([Document("api-doc", "Added through the API, with no source file.")])
    (docs / "sub" / "b.md").unlink()
    (docs / "c.jsonl").write_text(json.dumps({"id": "q1", "text": "Badgers dig setts."}) + "\n", encoding="utf-8")
    kept = retriever.add_paths([docs])  # without remove_missing nothing is deleted
    assert kept.removed_doc_ids == () and "sub/b.md" in retriever.doc_ids()
    report = retriever.add_paths([docs], remove_missing=True)
    assert report.removed_doc_ids == ("q2", "sub/b.md") and report.num_chunks_removed == 2
    assert set(retriever.doc_ids()) == {"a.txt", "api-doc", str(other), "q1"}
    assert all(h.doc_id != "sub/b.md" for h in retriever.search("otters slide", 10, "bm25"))
    # every file of the folder gone: its documents go, the rest of the index stays
    for path in (docs / "a.txt", docs / "c.jsonl"):
        path.unlink()
    report = retriever.add_paths([docs], remove_missing=True)
    assert report.removed_doc_ids == ("a.txt", "q1") and (report.num_added, report.num_unchanged) == (0, 0)
    assert set(retriever.doc_ids()) == {"api-doc", str(other)}


def test_a_renamed_file_moves_its_document(tmp_path: Path) -> None:
    docs = _folder(tmp_path / "docs")
    retriever = _retriever()
    retriever.add_paths([docs])
    (docs / "a.txt").rename(docs / "herons.txt")
    report = retriever.add_paths([docs], remove_missing=True)
    assert report.num_added == 1 and report.removed_doc_ids == ("a.txt",)
    assert retriever.search("herons wade", 1, "bm25")[0].doc_id == "herons.txt"
