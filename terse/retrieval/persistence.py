"""An index on disk: versioned directories published by an atomic pointer swap.

    index_dir/
      CURRENT              "v000007\\n": the published version (replaced with os.replace)
      v000007/
        manifest.json      format, embedder signature and dimension, config, stats, file checksums
        chunks.sqlite      documents + chunks (store.py)
        vectors.faiss      the vector index (+ vectors.ids.npy: id of each position; HNSW tombstones)
        bm25/              the BM25 index (bm25s numpy/JSON files)

A save writes a complete new version into a hidden temporary directory, fsyncs it, renames it to its
final name, then swaps CURRENT to it. A crash at any point before the swap leaves CURRENT naming the
old, complete version; only after the swap are older versions deleted. Nothing is pickled, and
every file's size and sha256 are checked against the manifest on open.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from terse.errors import RetrievalIndexError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_VERSION_PREFIX = "v"
_TMP_PREFIX = ".tmp-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions(root: Path) -> list[str]:
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(_VERSION_PREFIX) and p.name[1:].isdigit()
    )


def write_version(root: Path, write_files: Callable[[Path], dict[str, Any]]) -> Path:
    """Publish a new version of the index at `root`; returns its directory.

    `write_files(tmp_dir)` writes the data files into `tmp_dir` and returns the manifest body; the
    file checksums are added here. Mutates `root` only by adding the version, swapping CURRENT and
    then pruning versions other than the new one (and stale temporary directories).
    """
    root.mkdir(parents=True, exist_ok=True)
    existing = _versions(root)
    name = f"{_VERSION_PREFIX}{int(existing[-1][1:]) + 1 if existing else 1:06d}"
    tmp_dir = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    try:
        manifest = write_files(tmp_dir)
        manifest["format_version"] = FORMAT_VERSION
        manifest["files"] = {
            p.relative_to(tmp_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp_dir.rglob("*"))
            if p.is_file()
        }
        (tmp_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        _fsync_tree(tmp_dir)
        final_dir = root / name
        os.replace(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    pointer_tmp = root / f"{_TMP_PREFIX}{CURRENT}-{os.getpid()}"
    pointer_tmp.write_text(name + "\n", encoding="utf-8")
    fd = os.open(pointer_tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(pointer_tmp, root / CURRENT)
    _fsync_dir(root)
    for stale in root.iterdir():
        if stale.name != name and (stale.name in existing or stale.name.startswith(_TMP_PREFIX)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return final_dir


def read_version(root: Path, verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """(version directory, manifest) of the published version at `root`.

    Raises RetrievalIndexError when there is no index, the manifest is unreadable or from another
    format version, or (with `verify`) a file is missing or differs from its recorded size/sha256.
    """
    pointer = root / CURRENT
    if not pointer.is_file():
        raise RetrievalIndexError(
            f"no index at {str(root)!r} (missing {CURRENT}); build one with `terse index <docs> -o {root}`"
        )
    version_dir = root / pointer.read_text(encoding="utf-8").strip()
    try:
        manifest: dict[str, Any] = json.loads((version_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RetrievalIndexError(
            f"index manifest {str(version_dir / MANIFEST)!r} is missing or not JSON ({e}); rebuild the index"
        ) from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RetrievalIndexError(
            f"index at {str(root)!r} has format_version={manifest.get('format_version')!r}; this terse "
            f"reads {FORMAT_VERSION}: rebuild the index"
        )
    if verify:
        for rel, expected in manifest.get("files", {}).items():
            path = version_dir / rel
            if not path.is_file():
                raise RetrievalIndexError(f"index file {str(path)!r} is missing; rebuild the index")
            if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
                raise RetrievalIndexError(
                    f"index file {str(path)!r} is corrupt (size or sha256 differs from the manifest); "
                    f"rebuild the index"
                )
    return version_dir, manifest
