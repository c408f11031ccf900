"""Reading documents from files: .txt, .md, .jsonl and (with the `pdf` extra) .pdf.

A directory is walked recursively for those suffixes, in sorted order; a document's id is its path
relative to the directory given (files given directly keep the path as given, normalised: `./a//b.txt`
is `a/b.txt`). A file reached twice (named directly and inside a folder given, or by two spellings)
is read once. Every document records the file's resolved path as `metadata["source"]`. A JSONL file
holds one document per line: an object with a string `id` and a string `text`; its other keys become
metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from terse.errors import InvalidRequestError
from terse.retrieval.types import Document

SUFFIXES: tuple[str, ...] = (".txt", ".md", ".jsonl", ".pdf")


def iter_files(paths: Sequence[str | Path]) -> Iterator[tuple[Path, str]]:
    """(file, id) pairs for every supported file under `paths`, each file once; a missing path raises."""
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            pairs = [(file, file.relative_to(path).as_posix()) for file in found]
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise InvalidRequestError(
                    f"{str(path)!r} has suffix {path.suffix!r}; supported: {', '.join(SUFFIXES)}"
                )
            pairs = [(path, Path(os.path.normpath(path)).as_posix())]
        else:
            raise InvalidRequestError(f"{str(path)!r} does not exist; pass existing files or directories")
        for file, doc_id in pairs:
            resolved = file.resolve()
            if resolved not in seen:
                seen.add(resolved)
                yield file, doc_id


def load_documents(paths: Sequence[str | Path]) -> list[Document]:
    """All documents under `paths`; unreadable or malformed files raise InvalidRequestError."""
    documents: list[Document] = []
    for file, doc_id in iter_files(paths):
        suffix = file.suffix.lower()
        source = str(file.resolve())
        if suffix == ".jsonl":
            documents.extend(_read_jsonl(file, source))
        elif suffix == ".pdf":
            documents.append(Document(doc_id, _read_pdf(file), {"source": source}))
        else:
            documents.append(Document(doc_id, _read_text(file), {"source": source}))
    return documents


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(
            f"{str(file)!r} is not valid UTF-8 (byte {e.start}); convert it, e.g. iconv -t utf-8"
        ) from e
    except OSError as e:
        raise InvalidRequestError(f"cannot read {str(file)!r}: {e.strerror}; check its permissions") from e


def _read_jsonl(file: Path, source: str) -> Iterator[Document]:
    for line_no, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{str(file)!r} line {line_no}"
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{where} is not JSON ({e.msg}); one object per line") from e
        except RecursionError as e:
            raise InvalidRequestError(f"{where} nests JSON too deeply; one flat object per line") from e
        if not isinstance(record, dict) or not isinstance(record.get("id"), str | int):
            raise InvalidRequestError(f"{where} needs an object with an 'id' (string) and a 'text' field")
        if not isinstance(record.get("text"), str):
            raise InvalidRequestError(f"{where}: 'text' must be a string, got {record.get('text')!r:.40}")
        metadata = {k: v for k, v in record.items() if k not in ("id", "text")}
        metadata["source"] = source
        yield Document(str(record["id"]), record["text"], metadata)


def _read_pdf(file: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError as e:
        raise InvalidRequestError(
            f"{str(file)!r} is a PDF; install the pdf extra (pip install 'terse[pdf]') to read it"
        ) from e
    try:
        reader = PdfReader(str(file))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PyPdfError, OSError, ValueError) as e:
        raise InvalidRequestError(f"cannot read PDF {str(file)!r}: {e}") from e
