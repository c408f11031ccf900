"""`IndexLock`: one writer at a time per index directory.

An update of an index is a read-modify-write cycle (open the published version, add documents, save
a new version). Two cycles that overlap both start from the same version, and the second save drops
what the first added. A writer therefore holds an exclusive advisory lock (`flock`) on
`<index>/LOCK` from before it opens the index until its save is published; a second writer waits (or,
with `wait=False`, fails at once naming the holder). Readers never lock: they see the published
version through the atomic CURRENT swap (persistence.py).

The kernel drops the lock when its holder exits, however it exits (kill -9 included), so a crash
never leaves a stale lock behind. The lock is re-entrant within one thread, so an update holding it
may call `Retriever.save()`, which takes it too; other threads and processes wait for it. The holder
removes the lock file before unlocking, and a waiter that wakes on a removed file tries again on the
new one, so at most one holder exists even while the file is replaced.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from terse.errors import RetrievalIndexError

LOCK_FILE = "LOCK"

WaitFn = Callable[[str], None]
"""Called once with a message (who holds the lock) when a writer has to wait for it."""


@dataclass
class _Held:
    thread_id: int
    depth: int
    fd: int
    path: Path


_held: dict[str, _Held] = {}  # resolved index directory -> this process's hold on it
_held_guard = threading.Lock()


class IndexLock:
    """Exclusive writer lock on the index directory `root` (created if missing). See the module docstring.

    `wait=False` raises `RetrievalIndexError` naming the holder instead of waiting; `on_wait(message)`
    is called once before waiting (the CLI prints it). Use as a context manager.
    """

    def __init__(self, root: str | Path, *, wait: bool = True, on_wait: WaitFn | None = None) -> None:
        self.root = Path(root)
        self.wait = wait
        self.on_wait = on_wait
        self._key: str | None = None

    def __enter__(self) -> IndexLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (waiting unless `wait=False`); re-entrant within the calling thread."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RetrievalIndexError(
                f"cannot use {str(self.root)!r} as an index directory ({e.strerror}); give a directory you can write"
            ) from e
        key = str(self.root.resolve())
        me = threading.get_ident()
        with _held_guard:
            held = _held.get(key)
            if held is not None and held.thread_id == me:
                held.depth += 1
                self._key = key
                return
        path = Path(key) / LOCK_FILE
        try:
            fd = self._lock_file(path)
        except OSError as e:
            raise RetrievalIndexError(
                f"cannot lock index {str(self.root)!r} ({e.strerror} on {LOCK_FILE}); check its permissions"
            ) from e
        with _held_guard:
            _held[key] = _Held(me, 1, fd, path)
        self._key = key

    def _lock_file(self, path: Path) -> int:
        announced = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _try_lock(fd):
                    holder = _holder(fd)
                    if not self.wait:
                        raise RetrievalIndexError(
                            f"index {str(self.root)!r} is being written by another process ({holder}); "
                            f"wait for it to finish, or run again without --no-wait to wait for it"
                        )
                    if not announced and self.on_wait is not None:
                        self.on_wait(
                            f"index {str(self.root)!r} is being written by another process ({holder}); "
                            f"waiting for it to finish"
                        )
                    announced = True
                    _lock_blocking(fd)
                if _same_file(fd, path):  # else the holder removed it while we waited: lock the new one
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.write(fd, f"pid {os.getpid()}\n".encode())
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def release(self) -> None:
        """Undo one `acquire()`; the last one removes the lock file and unlocks."""
        key, self._key = self._key, None
        if key is None:
            return
        with _held_guard:
            held = _held[key]
            held.depth -= 1
            if held.depth:
                return
            del _held[key]
        if sys.platform != "win32":  # removed while still locked; waiters on it retry (see _lock_file)
            held.path.unlink(missing_ok=True)
        _unlock(held.fd)
        os.close(held.fd)


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)  # msvcrt locks bytes from the current position
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _lock_blocking(fd: int) -> None:
        while not _try_lock(fd):
            time.sleep(0.1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _lock_blocking(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
