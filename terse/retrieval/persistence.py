"""An index on disk: versioned directories published by an atomic pointer swap.

    index_dir/
      CURRENT              "v000007\\n": the published version (replaced with os.replace)
      LOCK                 present while a writer holds the index (lock.py)
      v000007/
        manifest.json      format, embedder signature and dimension, config, stats, file checksums
        manifest.sha256    sha256 of manifest.json (a flipped byte in the manifest is caught too)
        chunks.sqlite      documents + chunks (store.py)
        vectors.faiss      the vector index (+ vectors.ids.npy: id of each position; HNSW tombstones)
        bm25/              the BM25 index (bm25s numpy/JSON files)

A save writes a complete new version into a hidden temporary directory, fsyncs it, renames it to its
final name, then swaps CURRENT to it. A crash at any point before the swap leaves CURRENT naming the
old, complete version; only after the swap are older versions deleted. Nothing is pickled, and
every file's size and sha256 are checked against the manifest on open. Saves hold the index's
`IndexLock`, and CURRENT must name a version directory of this index (never a path elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from terse.errors import RetrievalIndexError
from terse.retrieval.lock import IndexLock

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest.sha256"
CURRENT = "CURRENT"
_VERSION_PREFIX = "v"
_VERSION_NAME = re.compile(r"v[0-9]{1,12}")
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
        (p.name for p in root.iterdir() if p.is_dir() and _VERSION_NAME.fullmatch(p.name)),
        key=lambda name: int(name[1:]),
    )


def current_version(root: Path) -> str | None:
    """The version CURRENT publishes (e.g. "v000007"), None when `root` holds no index.

    Raises RetrievalIndexError when CURRENT is unreadable or names anything but a version directory
    directly inside `root` (a path such as "../other_index/v000002" would open another index).
    """
    pointer = root / CURRENT
    try:
        raw = pointer.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RetrievalIndexError(f"cannot read {str(pointer)!r} ({e.strerror}); check its permissions") from e
    name = raw.decode("ascii", "replace").strip()
    found = _versions(root)
    if not _VERSION_NAME.fullmatch(name) or not (root / name).is_dir() or (root / name).is_symlink():
        raise RetrievalIndexError(
            f"{str(pointer)!r} holds {raw[:60]!r}, not the name of a version directory of this index "
            f"(such as {found[-1] if found else 'v000001'!r}); the index is damaged: write the newest "
            f"version's name into CURRENT ({found or 'none found'}) or rebuild the index"
        )
    return name


def write_version(
    root: Path, write_files: Callable[[Path], dict[str, Any]], *, expect_current: str | None = None
) -> Path:
    """Publish a new version of the index at `root` under its `IndexLock`; returns its directory.

    `write_files(tmp_dir)` writes the data files into `tmp_dir` and returns the manifest body; the
    file checksums are added here. With `expect_current`, CURRENT must still name that version (the
    one the caller's data was read from), else RetrievalIndexError: another writer published in
    between, and saving would drop its changes. Mutates `root` only by adding the version, swapping
    CURRENT and then pruning versions other than the new one (and stale temporary directories).
    """
    with IndexLock(root):
        if expect_current is not None and (published := current_version(root)) != expect_current:
            raise RetrievalIndexError(
                f"index {str(root)!r} changed since it was opened (read {expect_current}, now {published}: "
                f"another writer saved in between); saving would drop its changes. Reopen the index and "
                f"apply yours again, and hold IndexLock({str(root)!r}) from open to save"
            )
        return _publish(root, write_files)


def _publish(root: Path, write_files: Callable[[Path], dict[str, Any]]) -> Path:
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
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        (tmp_dir / MANIFEST).write_bytes(manifest_bytes)
        (tmp_dir / MANIFEST_SHA256).write_text(hashlib.sha256(manifest_bytes).hexdigest() + "\n", encoding="ascii")
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

    Raises RetrievalIndexError when there is no index, CURRENT does not name a version of this index,
    the manifest is unreadable, damaged (its sha256 differs) or from another format version, or (with
    `verify`) a file is missing or differs from its recorded size/sha256.
    """
    name = current_version(root)
    if name is None:
        raise RetrievalIndexError(
            f"no index at {str(root)!r} (missing {CURRENT}); build one with `terse index <docs> -o {root}`"
        )
    version_dir = root / name
    manifest = _read_manifest(version_dir)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RetrievalIndexError(
            f"index at {str(root)!r} has format_version={manifest.get('format_version')!r}; this terse "
            f"reads {FORMAT_VERSION}: rebuild the index"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(_is_file_entry(rel, entry) for rel, entry in files.items()):
        raise RetrievalIndexError(f"index manifest {str(version_dir / MANIFEST)!r} has no valid file list; rebuild the index")
    if verify:
        for rel, expected in files.items():
            path = version_dir / rel
            try:
                intact = path.stat().st_size == expected["bytes"] and _sha256(path) == expected["sha256"]
            except OSError as e:  # missing (or pruned by a writer while being read: Retriever.open retries)
                raise RetrievalIndexError(f"index file {str(path)!r} is missing ({e.strerror}); rebuild the index") from e
            if not intact:
                raise RetrievalIndexError(
                    f"index file {str(path)!r} is corrupt (size or sha256 differs from the manifest); "
                    f"rebuild the index"
                )
    return version_dir, manifest


def _read_manifest(version_dir: Path) -> dict[str, Any]:
    path = version_dir / MANIFEST
    try:
        data = path.read_bytes()
        recorded = (version_dir / MANIFEST_SHA256).read_bytes() if (version_dir / MANIFEST_SHA256).exists() else None
    except OSError as e:
        raise RetrievalIndexError(f"index manifest {str(path)!r} is missing or unreadable ({e}); rebuild the index") from e
    if recorded is not None and recorded.strip() != hashlib.sha256(data).hexdigest().encode():
        raise RetrievalIndexError(
            f"index manifest {str(path)!r} is corrupt (its sha256 differs from {MANIFEST_SHA256}); rebuild the index"
        )
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RetrievalIndexError(f"index manifest {str(path)!r} is not JSON ({e}); rebuild the index") from e
    if not isinstance(manifest, dict):
        raise RetrievalIndexError(f"index manifest {str(path)!r} is not a JSON object; rebuild the index")
    return manifest


def _is_file_entry(rel: Any, entry: Any) -> bool:
    """A manifest file entry: a plain relative path inside the version, with an int size and hex sha256."""
    return (
        isinstance(rel, str)
        and not Path(rel).is_absolute()
        and ".." not in Path(rel).parts
        and isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
    )
