"""Crash-safe JSONL journals: the answers file and the failures file.

Writing: each record is one complete line written with a single `write`, then flushed and fsynced,
so after a kill -9 the file holds whole lines plus, at worst, one torn last line.

Reading: a last line without its newline (or one that does not parse) is a torn write; it is dropped
and the file truncated back to the last complete line before anything new is appended. A malformed
line anywhere else is not a crash artefact, so it raises `InvalidRequestError` with its line number.

    answers.jsonl   {"id": "q1", ...}\\n {"id": "q2", ...}\\n {"id": "q3", "ans   <- torn: dropped
                    └──────── kept ──────────────────────┘
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

from terse.errors import InvalidRequestError


class JsonlJournal:
    """An append-only JSONL file of records keyed by their "id" field. Not thread-safe: one writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        """Records already in the file (torn last line excluded), in file order."""
        self.num_torn_lines = 0
        """1 when a torn last line was found and dropped on open."""
        self._file: IO[bytes] | None = None
        self._recover()

    def _recover(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        good_end = 0
        lines = data.split(b"\n")
        for line_no, raw in enumerate(lines, start=1):
            is_last = line_no == len(lines)
            if is_last:
                if raw.strip():  # bytes after the final newline: a write cut short
                    self.num_torn_lines = 1
                break
            if not raw.strip():
                good_end += len(raw) + 1
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError("not an object with an id")
            except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deeply
                if line_no == len(lines) - 1 and not lines[-1]:
                    # the last complete line may still be garbage from a torn write of a filesystem
                    # that zero-fills; treat it as torn too
                    self.num_torn_lines = 1
                    break
                raise InvalidRequestError(
                    f"{self.path}:{line_no}: not a valid record ({e}); the file was edited by hand or "
                    f"belongs to another program: fix or remove that line, or choose another output path"
                ) from e
            self.records.append(record)
            good_end += len(raw) + 1
        if good_end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    def ids(self) -> set[str]:
        return {str(r["id"]) for r in self.records}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line, durably (flush + fsync) before returning."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records.append(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
