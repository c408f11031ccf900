"""Reading .txt / .md / .jsonl inputs, directory walks, and typed errors for bad files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from terse.errors import InvalidRequestError
from terse.retrieval import ChunkerConfig, Retriever, RetrieverConfig
from terse.retrieval.loaders import load_documents
from tests.retrieval.conftest import HashEmbedder


def _write_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Plain text about herons.", encoding="utf-8")
    (root / "sub" / "b.md").write_text("# Title\n\nMarkdown about otters. Ünïcödé too.", encoding="utf-8")
    (root / "c.jsonl").write_text(
        json.dumps({"id": "q1", "text": "JSON line about badgers.", "lang": "en"}) + "\n\n"
        + json.dumps({"id": 7, "text": "Second line about voles."}) + "\n",
        encoding="utf-8",
    )
    (root / "ignored.csv").write_text("x,y", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    return root


def test_folder_walk_ids_and_metadata(tmp_path: Path) -> None:
    docs = load_documents([_write_folder(tmp_path / "docs")])
    assert [d.id for d in docs] == ["a.txt", "q1", "7", "empty.txt", "sub/b.md"]
    by_id = {d.id: d for d in docs}
    assert by_id["q1"].metadata["lang"] == "en" and by_id["q1"].metadata["source"].endswith("c.jsonl")
    assert by_id["sub/b.md"].text.startswith("# Title")


def test_retriever_indexes_a_folder(tmp_path: Path) -> None:
    retriever = Retriever(RetrieverConfig(chunker=ChunkerConfig(16, 2)), embedder=HashEmbedder())
    report = retriever.add_paths([_write_folder(tmp_path / "docs")])
    assert report.num_added == 5 and retriever.stats().num_chunks == 4  # one each; the empty file none
    assert retriever.search("badgers", 1, "bm25")[0].doc_id == "q1"


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("bad.txt", b"\xff\xfe not utf-8 \xc3", "not valid UTF-8"),
        ("bad.jsonl", b'{"id": "a", "text": "ok"}\n{broken\n', "line 2 is not JSON"),
        ("noid.jsonl", b'{"text": "no id"}\n', "needs an object with an 'id'"),
        ("notext.jsonl", b'{"id": "a", "body": "x"}\n', "'text' must be a string"),
        ("table.csv", b"a,b\n", "suffix '.csv'"),
    ],
)
def test_unreadable_inputs_raise_typed_errors(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InvalidRequestError, match=match):
        load_documents([tmp_path / name])


def test_missing_path_and_empty_corpus(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="does not exist"):
        load_documents([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    retriever = Retriever(embedder=HashEmbedder())
    with pytest.raises(InvalidRequestError, match="no .txt, .md, .jsonl or .pdf documents"):
        retriever.add_paths([tmp_path / "empty"])


def _minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.mark.skipif(importlib.util.find_spec("pypdf") is None, reason="needs the pdf extra (pypdf)")
def test_pdf_text_is_extracted(tmp_path: Path) -> None:
    (tmp_path / "paper.pdf").write_bytes(_minimal_pdf("The kiln fires at dawn."))
    (doc,) = load_documents([tmp_path])
    assert doc.id == "paper.pdf" and "The kiln fires at dawn." in doc.text
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.4 truncated")
    with pytest.raises(InvalidRequestError, match="cannot read PDF"):
        load_documents([tmp_path / "paper.pdf"])


def test_pdf_without_the_extra_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pypdf", None)  # import pypdf now raises ImportError
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4\n")
    with pytest.raises(InvalidRequestError, match=r"terse\[pdf\]"):
        load_documents([tmp_path / "doc.pdf"])
