"""Fault injection on files: concurrent `terse index` writers, kill -9 during index saves, damaged
index files and non-UTF-8 inputs. Each must end in a complete index or one clean error line (exit 2),
never a lost update or a traceback."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from terse.pipelines.cli import main
from terse.retrieval import ChunkerConfig, Document, IndexLock, Retriever, RetrieverConfig
from tests.retrieval.conftest import HashEmbedder

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _terse(*argv: str, stderr: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "terse.pipelines.cli", *argv], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=stderr.open("wb"))


def _wait_for(predicate: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _folder(root: Path, name: str, num_docs: int) -> Path:
    root.mkdir(parents=True)
    for i in range(num_docs):
        (root / f"{name}-{i}.txt").write_text(f"Note {i} of {name}: the {name} archive keeps item {i}.", encoding="utf-8")
    return root


def test_concurrent_terse_index_writers_wait_and_lose_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _folder(tmp_path / "a", "alder", 20), _folder(tmp_path / "b", "birch", 20)
    index = tmp_path / "idx"
    logs = [tmp_path / f"{n}.err" for n in ("first", "second", "impatient")]
    with IndexLock(index):  # this test is the writer already at work
        first = _terse("index", str(a), "-o", str(index), "--no-progress", stderr=logs[0])
        second = _terse("index", str(b), "-o", str(index), "--no-progress", stderr=logs[1])
        impatient = _terse("index", str(b), "-o", str(index), "--no-progress", "--no-wait", stderr=logs[2])
        assert impatient.wait(60) == 2
        err = logs[2].read_text().strip()
        assert len(err.splitlines()) == 1 and f"being written by another process (pid {os.getpid()})" in err
        _wait_for(lambda: all("waiting for it to finish" in log.read_text() for log in logs[:2]), 60)
        assert first.poll() is None and second.poll() is None
    assert first.wait(120) == 0 and second.wait(120) == 0, [log.read_text() for log in logs]
    retriever = Retriever.open(index)
    assert len(retriever.doc_ids()) == 40 and sorted(os.listdir(index)) == ["CURRENT", "v000002"]

    # a rerun drops what is gone, whatever the spelling of the folder
    (a / "alder-3.txt").unlink()
    assert main(["index", f"{tmp_path}/a/../a/", "-o", str(index), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "0 added, 0 updated, 19 unchanged" in out and "removed 1 document(s) whose files are gone: alder-3.txt" in out
    assert len(Retriever.open(index).doc_ids()) == 39

    # damaged index files: one clean line and exit 2 from `terse search`
    version = index / "v000003"
    manifest = (version / "manifest.json").read_bytes()
    damages = [
        (version / "manifest.json", manifest[:40] + bytes([manifest[40] ^ 0x20]) + manifest[41:]),
        (version / "manifest.json", manifest[:100] + b"\xff\xfe" + manifest[102:]),
        (index / "CURRENT", b"\xff\xfe\x00v3\n"),
        (index / "CURRENT", b"../other_index/v000002\n"),
    ]
    for path, data in damages:
        original = path.read_bytes()
        path.write_bytes(data)
        assert main(["search", str(index), "alder archive"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("terse search: error:"), err
        path.write_bytes(original)


_SAVE_LOOP = """
import sys
from pathlib import Path
from terse.retrieval import Document, IndexLock, Retriever
from tests.retrieval.conftest import HashEmbedder
root, first = Path(sys.argv[1]), int(sys.argv[2])
for i in range(first, first + 100_000):
    with IndexLock(root):
        retriever = Retriever.open(root, embedder=HashEmbedder())
        retriever.add_documents([Document(f"new-{i}", f"Added note {i} about the kestrel.")])
        retriever.save(root)
    print(i, flush=True)
"""


def test_kill_9_during_saves_leaves_a_complete_index_and_no_stale_lock(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    base = Retriever(RetrieverConfig(chunker=ChunkerConfig(24, 4)), embedder=HashEmbedder())
    base.add_documents([Document(f"base-{i}", f"Base note {i} about heron {i % 13} and otter {i % 7}.") for i in range(300)])
    base.save(root)
    rng = random.Random(19)
    next_id = 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(root), str(next_id)], env=ENV, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert proc.stdout is not None and proc.stdout.readline()  # at least one save published
            time.sleep(rng.uniform(0.0, 0.4))  # most of the loop's time is spent saving
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        with IndexLock(root, wait=False):  # the kernel released the dead writer's lock
            reopened = Retriever.open(root, embedder=HashEmbedder())
            ids = set(reopened.doc_ids())
            new = sorted(int(d.removeprefix("new-")) for d in ids if d.startswith("new-"))
            assert new == list(range(len(new))) and len(ids) == 300 + len(new)  # whole saves only, in order
            assert reopened.search("kestrel", 1, "bm25")[0].doc_id.startswith("new-")
            next_id = len(new)
    assert next_id >= 5


def test_docqa_questions_with_a_non_utf8_byte_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Alice works at Acme.", encoding="utf-8")
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b'{"id": "1", "question": "Where does Alice work?"}\n{"id": "2", "question": "caf\xe9?"}\n')
    argv = ["docqa", "--docs", str(docs), "--questions", str(questions), "--out", str(tmp_path / "a.jsonl"),
            "--backend", "hf:unused", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "q.jsonl:2: not valid UTF-8 (byte 0xe9 at column 29)" in err
    questions.write_bytes(b'{"id": "1", "question": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "q.jsonl:1: not a usable JSON object (RecursionError" in err
