"""Save/open round trips, crash safety, incremental updates by content hash, and typed errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from terse.errors import InvalidRequestError, RetrievalIndexError
from terse.retrieval import ChunkerConfig, Document, IndexConfig, Retriever, RetrieverConfig, persistence
from terse.retrieval.bm25 import BM25Index
from terse.retrieval.calibration import RecallReport
from tests.retrieval.conftest import HashEmbedder

ANIMALS = ["otter", "heron", "badger", "lynx", "marten", "ibis", "vole", "stoat"]


def _docs(version: int = 0) -> list[Document]:
    return [
        Document(f"{a}.txt", f"The {a} lives near water number {i}. Version {version} of the {a} notes. "
                 f"It eats fish and the {a} sleeps by day.", {"source": f"{a}.txt"})
        for i, a in enumerate(ANIMALS)
    ]


def _config(**index: object) -> RetrieverConfig:
    return RetrieverConfig(chunker=ChunkerConfig(chunk_tokens=12, overlap_tokens=2), index=IndexConfig(**index))  # type: ignore[arg-type]


class CountingEmbedder(HashEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.num_documents_embedded = 0

    def embed_documents(self, texts, progress=None):  # type: ignore[no-untyped-def]
        self.num_documents_embedded += len(texts)
        return super().embed_documents(texts, progress)


def _results(retriever: Retriever) -> list[list[tuple[int, str, float]]]:
    return [
        [(h.chunk_id, h.doc_id, round(h.score, 6)) for h in retriever.search(f"where does the {a} live", 4, mode)]
        for a in ANIMALS[:3]
        for mode in ("dense", "bm25", "hybrid")
    ]


def test_round_trip_reopens_without_embedding(tmp_path: Path) -> None:
    retriever = Retriever(_config(), embedder=HashEmbedder())
    retriever.add_documents(_docs())
    retriever.save(tmp_path / "idx")
    embedder = CountingEmbedder()
    reopened = Retriever.open(tmp_path / "idx", embedder=embedder)
    assert _results(reopened) == _results(retriever)
    assert embedder.num_documents_embedded == 0
    assert reopened.stats() == retriever.stats()
    assert reopened.doc_ids() == sorted(d.id for d in _docs())
    hit = reopened.search("badger", 1, "bm25")[0]
    assert _docs()[2].text[hit.char_start : hit.char_end] == hit.text
    # reopened indexes update incrementally and save again
    assert reopened.add_documents([Document("newt.txt", "A newt swims in the pond.")]).num_added == 1
    assert embedder.num_documents_embedded == 1
    reopened.save(tmp_path / "idx")
    assert Retriever.open(tmp_path / "idx", embedder=HashEmbedder()).search("newt", 1, "bm25")[0].doc_id == "newt.txt"
    assert sorted(os.listdir(tmp_path / "idx")) == ["CURRENT", "v000002"]


@pytest.mark.parametrize("fail_in", ["bm25", "pointer"])
def test_crash_during_save_leaves_old_index_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str
) -> None:
    root = tmp_path / "idx"
    retriever = Retriever(_config(), embedder=HashEmbedder())
    retriever.add_documents(_docs())
    retriever.save(root)
    before = _results(retriever)
    retriever.add_documents(_docs(version=1))
    if fail_in == "bm25":  # data files half written
        monkeypatch.setattr(BM25Index, "write", lambda self, directory: (_ for _ in ()).throw(OSError("disk full")))
    else:  # new version complete on disk but CURRENT never swapped

        real_replace = os.replace

        def replace(src: str, dst: str) -> None:
            if Path(dst).name == persistence.CURRENT:
                raise OSError("power cut")
            real_replace(src, dst)

        monkeypatch.setattr(persistence.os, "replace", replace)
    with pytest.raises(OSError):
        retriever.save(root)
    monkeypatch.undo()
    old = Retriever.open(root, embedder=HashEmbedder())
    assert _results(old) == before
    assert "Version 0" in old.search("otter", 1, "bm25")[0].text
    retriever.save(root)  # the next save succeeds and cleans up what the crash left
    assert Retriever.open(root, embedder=HashEmbedder()).search("otter", 1, "bm25")[0].text.count("Version 1")
    assert [p for p in os.listdir(root) if p != "CURRENT"] == ["v000003" if fail_in == "pointer" else "v000002"]


def test_update_by_content_hash_and_delete() -> None:
    embedder = CountingEmbedder()
    retriever = Retriever(_config(), embedder=embedder)
    first = retriever.add_documents(_docs())
    assert (first.num_added, first.num_updated, first.num_unchanged) == (8, 0, 0)
    num_chunks = retriever.stats().num_chunks
    embedded = embedder.num_documents_embedded
    same = retriever.add_documents(_docs())
    assert (same.num_unchanged, same.num_chunks_added) == (8, 0) and embedder.num_documents_embedded == embedded
    old_ids = {h.chunk_id for h in retriever.search("otter", 50, "bm25", doc_ids=["otter.txt"])}
    changed = [Document("otter.txt", "The otter moved to the mountains. It now eats berries.")]
    report = retriever.add_documents(changed)
    assert (report.num_updated, report.num_chunks_removed) == (1, len(old_ids))
    hits = retriever.search("otter mountains berries", 50, "hybrid", doc_ids=["otter.txt"])
    assert [h.text for h in hits] == [changed[0].text]  # 12 tokens: one chunk
    assert not old_ids & {h.chunk_id for h in hits}  # chunk ids are never reused
    assert all("Version" not in h.text for h in retriever.search("otter water", 20, "dense") if h.doc_id == "otter.txt")
    removed = retriever.delete(["heron.txt", "lynx.txt"])
    assert removed > 0 and retriever.stats().num_chunks == num_chunks - len(old_ids) + 1 - removed
    assert all(h.doc_id not in ("heron.txt", "lynx.txt") for h in retriever.search("heron lynx", 50, "hybrid"))
    with pytest.raises(InvalidRequestError, match="heron.txt"):
        retriever.delete(["heron.txt"])


def test_hnsw_deletes_survive_reopen(tmp_path: Path) -> None:
    docs = [Document(f"d{i}", f"Item {i} has colour {i % 7} and weight {i % 11}.") for i in range(120)]
    retriever = Retriever(_config(kind="hnsw", num_recall_queries=50), embedder=HashEmbedder())
    retriever.add_documents(docs)
    retriever.delete([f"d{i}" for i in range(10)])
    assert retriever.vectors is not None and retriever.vectors.kind == "hnsw"
    retriever.save(tmp_path / "idx")
    reopened = Retriever.open(tmp_path / "idx", embedder=HashEmbedder())
    hits = reopened.search("Item 3 has colour 3", 110, "dense")
    assert len(hits) == 110 and not {f"d{i}" for i in range(10)} & {h.doc_id for h in hits}


def test_auto_switches_to_hnsw_only_after_measuring_recall(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [Document(f"d{i}", f"Record {i} mentions town {i % 13} and river {i % 17}.") for i in range(150)]
    retriever = Retriever(_config(flat_max_vectors=100, num_recall_queries=50), embedder=HashEmbedder())
    retriever.add_documents(docs[:90])
    assert retriever.stats().index_kind == "flat"
    retriever.add_documents(docs[90:])
    stats = retriever.stats()
    assert stats.index_kind == "hnsw" and stats.recall is not None
    assert stats.recall.kind == "hnsw" and stats.recall.recall >= 0.95 and stats.recall.num_queries == 50

    def failing(index: object, config: IndexConfig) -> RecallReport:
        return RecallReport("hnsw", 0.5, 10, 50, 150, "ef_search", 2048, False)

    monkeypatch.setattr("terse.retrieval.retriever.calibrate", failing)
    rejected = Retriever(_config(flat_max_vectors=100), embedder=HashEmbedder())
    rejected.add_documents(docs)
    assert rejected.stats().index_kind == "flat" and rejected.stats().recall.recall == 0.5  # type: ignore[union-attr]


def test_open_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(RetrievalIndexError, match="no index at"):
        Retriever.open(tmp_path / "missing", embedder=HashEmbedder())
    root = tmp_path / "idx"
    retriever = Retriever(_config(), embedder=HashEmbedder())
    retriever.add_documents(_docs())
    retriever.save(root)
    with pytest.raises(RetrievalIndexError, match="built with embedder"):
        Retriever.open(root, embedder=HashEmbedder(name="other-model"))
    with pytest.raises(RetrievalIndexError, match="built with embedder"):
        Retriever.open(root)  # the default MiniLM embedder is not the one recorded
    version = root / "v000001"
    data = bytearray((version / "vectors.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (version / "vectors.faiss").write_bytes(bytes(data))
    with pytest.raises(RetrievalIndexError, match="corrupt"):
        Retriever.open(root, embedder=HashEmbedder())
    (version / "chunks.sqlite").unlink()
    with pytest.raises(RetrievalIndexError, match="missing"):
        Retriever.open(root, embedder=HashEmbedder())
    (version / "manifest.json").write_text("{not json")
    with pytest.raises(RetrievalIndexError, match="manifest.* is corrupt"):  # caught by its checksum
        Retriever.open(root, embedder=HashEmbedder())
    (version / "manifest.sha256").unlink()
    with pytest.raises(RetrievalIndexError, match="not JSON"):
        Retriever.open(root, embedder=HashEmbedder())


def test_bad_input_is_typed() -> None:
    retriever = Retriever(_config(), embedder=HashEmbedder())
    with pytest.raises(RetrievalIndexError, match="no chunks"):
        retriever.search("anything")
    with pytest.raises(InvalidRequestError, match="no documents"):
        retriever.add_documents([])
    with pytest.raises(InvalidRequestError, match="contain no text"):
        retriever.add_documents([Document("a", ""), Document("b", "  \n")])
    with pytest.raises(InvalidRequestError, match="appears twice"):
        retriever.add_documents([Document("a", "x"), Document("a", "y")])
    retriever.add_documents(_docs())
    with pytest.raises(InvalidRequestError, match="query"):
        retriever.search("   ")
    with pytest.raises(InvalidRequestError, match="k=0"):
        retriever.search("otter", k=0)
    with pytest.raises(InvalidRequestError, match="mode='sparse'"):
        retriever.search("otter", mode="sparse")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="unknown document"):
        retriever.search("otter", doc_ids=["nope.txt"])
    with pytest.raises(InvalidRequestError, match="non-empty string"):
        Document("", "text")


def test_hnsw_graph_is_rebuilt_past_the_tombstone_share() -> None:
    docs = [Document(f"d{i}", f"Entry {i} about harbour {i % 9}.") for i in range(100)]
    retriever = Retriever(_config(kind="hnsw", max_tombstone_fraction=0.2, num_recall_queries=30),
                          embedder=HashEmbedder())
    retriever.add_documents(docs)
    retriever.delete([f"d{i}" for i in range(15)])
    assert len(retriever.vectors.tombstones) == 15  # type: ignore[union-attr]
    retriever.delete([f"d{i}" for i in range(15, 25)])  # 25 of 100 > 20%: rebuilt without them
    assert retriever.vectors is not None and retriever.vectors.kind == "hnsw"
    assert len(retriever.vectors.tombstones) == 0 and retriever.vectors.num_vectors == 75  # type: ignore[attr-defined]
    assert {h.doc_id for h in retriever.search("Entry about harbour", 100, "dense")} == {f"d{i}" for i in range(25, 100)}


def test_auto_uses_ivf_for_large_collections_and_reopens(tmp_path: Path) -> None:
    docs = [Document(f"d{i}", f"Note {i} on bridge {i % 11} and tower {i % 7}.") for i in range(400)]
    config = _config(flat_max_vectors=50, ivf_min_vectors=200, num_recall_queries=50, min_recall=0.9)
    retriever = Retriever(config, embedder=HashEmbedder())
    retriever.add_documents(docs)
    stats = retriever.stats()
    assert stats.index_kind == "ivf" and stats.recall is not None and stats.recall.recall >= 0.9
    retriever.delete(["d3"])
    retriever.save(tmp_path / "idx")
    reopened = Retriever.open(tmp_path / "idx", embedder=HashEmbedder())
    assert reopened.stats().index_kind == "ivf" and reopened.stats().num_chunks == 399
    assert _results_for(reopened, "Note 5 on bridge 5") == _results_for(retriever, "Note 5 on bridge 5")


def _results_for(retriever: Retriever, query: str) -> list[tuple[int, float]]:
    return [(h.chunk_id, round(h.score, 6)) for h in retriever.search(query, 5, "dense")]


def test_save_records_the_recall_of_what_it_saves(tmp_path: Path) -> None:
    docs = [Document(f"d{i}", f"Record {i} mentions town {i % 13} and river {i % 17}.") for i in range(170)]
    retriever = Retriever(_config(flat_max_vectors=100, num_recall_queries=50), embedder=HashEmbedder())
    retriever.add_documents(docs[:150])
    retriever.add_documents(docs[150:])  # +13%: below the 25% that re-measures on add
    assert retriever.stats().recall.num_vectors == 150  # type: ignore[union-attr]
    retriever.save(tmp_path / "idx")
    recall = Retriever.open(tmp_path / "idx", embedder=HashEmbedder()).stats().recall
    assert recall is not None and recall.kind == "hnsw" and recall.num_vectors == 170


def _saved(root: Path, docs: list[Document] | None = None) -> Retriever:
    retriever = Retriever(_config(), embedder=HashEmbedder())
    retriever.add_documents(docs or _docs())
    retriever.save(root)
    return retriever


def test_current_must_name_a_version_inside_the_index(tmp_path: Path) -> None:
    _saved(tmp_path / "mine")
    _saved(tmp_path / "other", [Document("secret.txt", "The other index holds a secret about herons.")])
    pointer = tmp_path / "mine" / persistence.CURRENT
    for escaping in ("../other/v000001", str(tmp_path / "other" / "v000001"), "v000001/../../other/v000001"):
        pointer.write_text(escaping + "\n")
        with pytest.raises(RetrievalIndexError, match="not the name of a version directory"):
            Retriever.open(tmp_path / "mine", embedder=HashEmbedder())
    (tmp_path / "mine" / "v000009").symlink_to(tmp_path / "other" / "v000001")  # a version-shaped link out
    pointer.write_text("v000009\n")
    with pytest.raises(RetrievalIndexError, match="not the name of a version directory"):
        Retriever.open(tmp_path / "mine", embedder=HashEmbedder())
    pointer.write_bytes(b"\xff\xfev0\x00\n")  # not UTF-8 at all
    with pytest.raises(RetrievalIndexError, match="not the name of a version directory"):
        Retriever.open(tmp_path / "mine", embedder=HashEmbedder())
    pointer.write_text("v000001\n")
    assert Retriever.open(tmp_path / "mine", embedder=HashEmbedder()).stats().num_documents == len(ANIMALS)


def test_every_flipped_manifest_byte_is_a_typed_error(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    _saved(root)
    manifest = root / "v000001" / persistence.MANIFEST
    original = manifest.read_bytes()
    for position in range(0, len(original), max(1, len(original) // 97)):
        for flip in (0x01, 0x80):
            data = bytearray(original)
            data[position] ^= flip
            manifest.write_bytes(bytes(data))
            with pytest.raises(RetrievalIndexError, match="manifest"):
                Retriever.open(root, embedder=HashEmbedder(), verify=False)
    manifest.write_bytes(original)
    (root / "v000001" / persistence.MANIFEST_SHA256).unlink()  # an index written before the checksum
    manifest.write_bytes(original.replace(b'"num_calibrated"', b'"num_calibratex"'))
    with pytest.raises(RetrievalIndexError, match="lacks a field"):
        Retriever.open(root, embedder=HashEmbedder())
    manifest.write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(RetrievalIndexError, match="not JSON"):
        Retriever.open(root, embedder=HashEmbedder())


def test_a_save_over_a_newer_version_is_refused_not_lost(tmp_path: Path) -> None:
    root = tmp_path / "idx"
    _saved(root)
    first = Retriever.open(root, embedder=HashEmbedder())
    second = Retriever.open(root, embedder=HashEmbedder())
    first.add_documents([Document("newt.txt", "A newt swims in the pond.")])
    first.save(root)
    second.add_documents([Document("toad.txt", "A toad sits under the stone.")])
    with pytest.raises(RetrievalIndexError, match="changed since it was opened"):
        second.save(root)  # would publish a version without newt.txt
    assert "newt.txt" in Retriever.open(root, embedder=HashEmbedder()).doc_ids()
    first.add_documents([Document("eft.txt", "An eft is a young newt.")])
    first.save(root)  # its own last save is the base: no conflict
    second.save(tmp_path / "elsewhere")  # another directory: nothing to conflict with


def test_lock_makes_a_second_writer_wait_or_fail(tmp_path: Path) -> None:
    import threading

    from terse.retrieval import IndexLock

    root = tmp_path / "idx"
    _saved(root)
    messages: list[str] = []
    done = threading.Event()

    def writer() -> None:
        with IndexLock(root, on_wait=messages.append):
            retriever = Retriever.open(root, embedder=HashEmbedder())
            retriever.add_documents([Document("toad.txt", "A toad sits under the stone.")])
            retriever.save(root)
        done.set()

    refused: list[BaseException] = []

    def impatient() -> None:
        try:
            IndexLock(root, wait=False).acquire()
        except RetrievalIndexError as e:
            refused.append(e)

    with IndexLock(root):
        other = threading.Thread(target=impatient)  # another thread is another writer
        other.start()
        other.join(10)
        assert refused and "being written by another process" in str(refused[0])
        thread = threading.Thread(target=writer)
        thread.start()
        for _ in range(200):
            if messages:
                break
            done.wait(0.01)
        assert messages and f"pid {os.getpid()}" in messages[0] and not done.is_set()
        retriever = Retriever.open(root, embedder=HashEmbedder())
        retriever.add_documents([Document("newt.txt", "A newt swims in the pond.")])
        retriever.save(root)  # re-entrant: this thread already holds the lock
    thread.join(10)
    assert done.is_set()
    assert {"newt.txt", "toad.txt"} <= set(Retriever.open(root, embedder=HashEmbedder()).doc_ids())
    assert not (root / "LOCK").exists()


def test_concurrent_locked_updates_lose_nothing(tmp_path: Path) -> None:
    import threading

    from terse.retrieval import IndexLock

    root = tmp_path / "idx"
    _saved(root)
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            for i in range(6):
                with IndexLock(root):
                    retriever = Retriever.open(root, embedder=HashEmbedder())
                    retriever.add_documents([Document(f"{name}-{i}", f"Note {i} written by {name}.")])
                    retriever.save(root)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(name,)) for name in ("ann", "bob", "cy")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    ids = set(Retriever.open(root, embedder=HashEmbedder()).doc_ids())
    assert {f"{n}-{i}" for n in ("ann", "bob", "cy") for i in range(6)} <= ids


def test_readers_never_fail_while_a_writer_publishes(tmp_path: Path) -> None:
    import threading

    root = tmp_path / "idx"
    _saved(root, [Document(f"d{i}", f"Record {i} on heron {i % 13} and otter {i % 7}.") for i in range(200)])
    stop = threading.Event()
    failures: list[BaseException] = []
    num_opened = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                Retriever.open(root, embedder=HashEmbedder()).search("heron", 1, "bm25")
                num_opened[0] += 1
            except BaseException as e:  # reported below
                failures.append(e)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        writer = Retriever.open(root, embedder=HashEmbedder())
        for i in range(12):  # each save publishes a version and prunes the one readers may be reading
            writer.add_documents([Document(f"w{i}", f"Written note {i} about a kestrel.")])
            writer.save(root)
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures[0]
    assert num_opened[0] > 0
