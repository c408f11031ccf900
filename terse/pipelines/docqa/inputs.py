"""Reading a job's inputs: the questions file and the documents (a folder, files, or an index).

Every mistake is reported with the file and line number: malformed JSON, a missing or non-string
field, a duplicate id, a question naming a document that is not in the corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from terse.errors import InvalidRequestError
from terse.pipelines.docqa.records import QuestionRecord
from terse.retrieval.loaders import load_documents
from terse.retrieval.types import Document


def read_questions(path: str | Path) -> list[QuestionRecord]:
    """Questions of a JSONL file ({id, question, optional doc_ids, optional answer, optional items}).

    Raises `InvalidRequestError` naming the line for malformed JSON, missing fields and duplicate ids;
    blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"questions file {str(path)!r} does not exist; pass a .jsonl file")
    records: list[QuestionRecord] = []
    first_line: dict[str, int] = {}
    for line_no, line in text_lines(path, "questions file"):
        if not line.strip():
            continue
        record = _question(json_line(line, path, line_no), path, line_no)
        if record.id in first_line:
            raise InvalidRequestError(
                f"{path}:{line_no}: duplicate question id {record.id!r} (first on line "
                f"{first_line[record.id]}); give every question a unique id"
            )
        first_line[record.id] = line_no
        records.append(record)
    return records


def text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file; `InvalidRequestError` naming the line and the
    byte for one that is not UTF-8 (a leading byte-order mark is allowed)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"cannot read {what} {str(path)!r}: {e.strerror}; check its permissions") from e
    for line_no, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            yield line_no, raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequestError(
                f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                f"save the {what} as UTF-8, e.g. iconv -t utf-8"
            ) from e


def json_line(line: str, path: Path, line_no: int) -> dict[str, Any]:
    """One JSON object from `line`, or `InvalidRequestError` naming the file and line."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); "
                                  f"write one JSON object per line") from e
    except (RecursionError, ValueError) as e:  # nested too deeply; integer literal too long
        raise InvalidRequestError(f"{path}:{line_no}: not a usable JSON object ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise InvalidRequestError(f"{path}:{line_no}: expected a JSON object, got {type(data).__name__}")
    return data


def _question(data: dict[str, Any], path: Path, line_no: int) -> QuestionRecord:
    where = f"{path}:{line_no}"
    qid = data.get("id")
    if isinstance(qid, bool) or not isinstance(qid, str | int) or str(qid) == "":
        raise InvalidRequestError(f"{where}: 'id' must be a non-empty string or integer, got {qid!r}")
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InvalidRequestError(f"{where}: 'question' must be a non-empty string, got {question!r:.60}")
    doc_ids = data.get("doc_ids") or []
    if not isinstance(doc_ids, list) or not all(isinstance(d, str | int) for d in doc_ids):
        raise InvalidRequestError(f"{where}: 'doc_ids' must be a list of document ids, got {doc_ids!r:.60}")
    answer = data.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise InvalidRequestError(f"{where}: 'answer' must be a string when given, got {answer!r:.60}")
    items = data.get("items") or []
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise InvalidRequestError(f"{where}: 'items' must be a list of strings, got {items!r:.60}")
    return QuestionRecord(
        id=str(qid),
        question=question,
        doc_ids=tuple(str(d) for d in doc_ids),
        answer=None if answer is None else str(answer),
        items=tuple(items),
        line_no=line_no,
    )


def load_corpus(paths: Sequence[str | Path]) -> dict[str, Document]:
    """Documents under `paths` (.txt, .md, .jsonl, .pdf with the pdf extra), by id; duplicate ids raise."""
    corpus: dict[str, Document] = {}
    for doc in load_documents(paths):
        if doc.id in corpus:
            raise InvalidRequestError(
                f"document id {doc.id!r} occurs twice (in {doc.metadata.get('source')!r} and "
                f"{corpus[doc.id].metadata.get('source')!r}); document ids must be unique"
            )
        corpus[doc.id] = doc
    if not corpus:
        raise InvalidRequestError(
            f"no documents found under {[str(p) for p in paths]}; supported files: .txt, .md, .jsonl, .pdf"
        )
    return corpus


def check_documents(questions: Sequence[QuestionRecord], corpus: dict[str, Document], source: str) -> None:
    """Raise `InvalidRequestError` for the first question naming a document missing from the corpus."""
    for q in questions:
        missing = [d for d in q.doc_ids if d not in corpus]
        if missing:
            known = ", ".join(sorted(corpus)[:5])
            raise InvalidRequestError(
                f"question {q.id!r} (line {q.line_no}) names document(s) {missing} that are not in "
                f"{source} ({len(corpus)} documents, e.g. {known}); fix the doc_ids or add the documents"
            )
