"""rag-100k: build, size, search latency and ANN recall of terse.retrieval at 100K chunks (CPU).

    .venv/bin/python bench/retrieval.py                       # full run (~10 min on 2 cores)
    .venv/bin/python bench/retrieval.py --num-chunks 5000 --num-embed 256   # quick check

What is measured, all in one process:
1. Embedding throughput of the bundled MiniLM on `--num-embed` synthetic prose chunks (~150 tokens),
   at 1 and at all torch threads.
2. 100K x 384 vectors drawn from a Gaussian fitted (mean + full covariance) to those real MiniLM
   chunk embeddings, then normalized: embedding 100K chunks would take most of an hour on 2 cores.
   Each of the 100K chunks gets a synthetic prose text, so BM25 and hybrid search run on real text.
3. Index build through the library's own path (`Retriever.add_documents`, with an embedder that
   returns the precomputed vectors): chunking + SQLite, flat build, the auto switch to HNSW with its
   recall calibration, BM25 build; then save size on disk and reopen time.
4. Search-only latency (query vectors precomputed; query embedding timed separately), batch 1,
   p50/p99 over `--num-queries` held-out queries: faiss flat vs HNSW alone, and `Retriever.search`
   in dense-flat, dense-HNSW, BM25 and hybrid modes (including hit assembly from SQLite).
5. HNSW recall@10 against exact flat search on the held-out queries, swept over efSearch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_WORDS = (  # noqa: SIM905
    "river harbour market council bridge winter summer engine village copper station garden tower "
    "festival museum railway factory forest valley island mountain library school theatre orchard "
    "merchant captain farmer teacher doctor painter weaver miller baker sailor soldier student "
    "builds repairs sells crosses visits describes records founded closed opened moved carried grew "
    "old new small large northern southern eastern western quiet busy ancient modern famous local "
    "wooden stone iron glass woollen golden silver narrow broad early late yearly weekly"
).split()


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(["ka", "lo", "mir", "ven", "tas", "dru", "sel", "bor", "nax", "pel"]) for _ in range(3))


def make_text(rng: random.Random, num_sentences: int) -> str:
    """Prose-like synthetic text: template sentences over a small vocabulary plus made-up names."""
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
        words.insert(rng.randint(0, len(words)), _name(rng).capitalize())
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def percentiles_ms(durations_ns: Sequence[int]) -> dict[str, float]:
    values = np.asarray(durations_ns, dtype=np.float64) / 1e6
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def time_each(fn: Callable[[int], object], num: int, num_warmup: int = 20) -> list[int]:
    for i in range(num_warmup):
        fn(i % num)
    durations = []
    for i in range(num):
        start = time.perf_counter_ns()
        fn(i)
        durations.append(time.perf_counter_ns() - start)
    return durations


class PrecomputedEmbedder:
    """Returns vectors computed elsewhere (documents in order, queries by text); counts with the
    MiniLM tokenizer so chunking runs as it would for real."""

    def __init__(self, tokenizer: Any, doc_vectors: np.ndarray, query_vectors: dict[str, np.ndarray]) -> None:
        self._tokenizer = tokenizer
        self._doc_vectors = doc_vectors
        self._next_row = 0
        self._query_vectors = query_vectors

    @property
    def dim(self) -> int:
        return int(self._doc_vectors.shape[1])

    @property
    def max_document_tokens(self) -> int:
        return 254

    def signature(self) -> dict[str, Any]:
        return {"model": "precomputed-minilm-fit", "query_prompt": None, "document_prompt": None, "normalize": True}

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return self._tokenizer.token_offsets(text)

    def embed_documents(self, texts: Sequence[str], progress: Any = None) -> np.ndarray:
        rows = self._doc_vectors[self._next_row : self._next_row + len(texts)]
        self._next_row += len(texts)
        return rows

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._query_vectors[t] for t in texts])


def bench_embedding(embedder: Any, texts: list[str]) -> dict[str, Any]:
    import torch

    results: dict[str, Any] = {"num_chunks": len(texts)}
    results["mean_tokens_per_chunk"] = float(np.mean([len(embedder.token_offsets(t)) for t in texts]))
    # all chunks at 1 torch thread (the vectors the 100K set is fitted to), a 128-chunk subset at
    # every thread count for comparison
    vectors = None
    for num_threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(num_threads)
        subset = texts if num_threads == 1 else texts[:128]
        embedder.embed_documents(texts[:32])  # warm-up
        start = time.perf_counter()
        out = embedder.embed_documents(subset)
        seconds = time.perf_counter() - start
        vectors = out if num_threads == 1 else vectors
        results[f"threads_{num_threads}"] = {
            "num_chunks": len(subset), "seconds": seconds, "chunks_per_s": len(subset) / seconds,
        }
    torch.set_num_threads(1)
    start = time.perf_counter()
    for t in texts[:50]:
        embedder.embed_queries([t[:80]])
    results["query_embed_ms"] = (time.perf_counter() - start) / 50 * 1e3
    assert vectors is not None
    return {"stats": results, "vectors": vectors}


def fitted_vectors(real: np.ndarray, num_vectors: int, seed: int) -> np.ndarray:
    """[num_vectors, dim] normalized samples of a Gaussian with the mean and covariance of `real`."""
    rng = np.random.default_rng(seed)
    mean = real.mean(axis=0)
    cov = np.cov(real, rowvar=False) + 1e-6 * np.eye(real.shape[1])
    out = rng.multivariate_normal(mean, cov, size=num_vectors, method="cholesky").astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def dir_bytes(path: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for p in path.rglob("*"):
        if p.is_file():
            key = p.parent.name if p.parent.name == "bm25" else p.name
            sizes[key] = sizes.get(key, 0) + p.stat().st_size
    sizes["total"] = sum(sizes.values())
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-chunks", type=int, default=100_000)
    parser.add_argument("--num-embed", type=int, default=2048, help="real chunks embedded with MiniLM")
    parser.add_argument("--num-queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/retrieval.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import bm25s
    import faiss
    import sentence_transformers
    import torch

    from terse.retrieval import ChunkerConfig, Document, IndexConfig, Retriever, RetrieverConfig
    from terse.retrieval.embedder import SentenceTransformerEmbedder

    rng = random.Random(args.seed)
    report: dict[str, Any] = {
        "workload": "rag-100k",
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "load_avg_start": os.getloadavg()},
        "versions": {"faiss": faiss.__version__, "bm25s": bm25s.__version__, "torch": torch.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
        "args": vars(args),
    }
    minilm = SentenceTransformerEmbedder()
    embed_texts = [make_text(rng, 8) for _ in range(args.num_embed)]
    embedded = bench_embedding(minilm, embed_texts)
    report["embedding"] = embedded["stats"]
    print("embedding:", json.dumps(embedded["stats"]))

    all_vectors = fitted_vectors(embedded["vectors"], args.num_chunks + args.num_queries, args.seed)
    doc_vectors, query_vectors = all_vectors[: args.num_chunks], all_vectors[args.num_chunks :]
    texts = [make_text(rng, 5) for _ in range(args.num_chunks)]
    queries = [" ".join(rng.choice(texts[rng.randrange(len(texts))].split()[:12]) for _ in range(4))
               + f" #{i}" for i in range(args.num_queries)]
    embedder = PrecomputedEmbedder(minilm, doc_vectors, dict(zip(queries, query_vectors)))

    config = RetrieverConfig(chunker=ChunkerConfig(chunk_tokens=254, overlap_tokens=0), index=IndexConfig())
    retriever = Retriever(config, embedder=embedder)
    docs = [Document(f"doc-{i}", t) for i, t in enumerate(texts)]
    build: dict[str, Any] = {}
    start = time.perf_counter()
    for first in range(0, len(docs), 10_000):  # incremental batches: flat first, auto switch on the way
        retriever.add_documents(docs[first : first + 10_000])
        print(f"  added {min(first + 10_000, len(docs))} chunks: {retriever.stats().index_kind}, "
              f"{time.perf_counter() - start:.1f}s", flush=True)
    build["add_documents_s"] = time.perf_counter() - start
    stats = retriever.stats()
    assert stats.num_chunks == args.num_chunks, stats
    build["index_kind"] = stats.index_kind
    build["calibration"] = None if stats.recall is None else stats.recall.to_json()
    start = time.perf_counter()
    retriever.search(queries[0], 10, "bm25")
    build["bm25_build_s"] = time.perf_counter() - start
    import faiss as faiss_mod

    flat = faiss_mod.IndexFlatIP(doc_vectors.shape[1])
    start = time.perf_counter()
    flat.add(doc_vectors)
    build["faiss_flat_build_s"] = time.perf_counter() - start
    # the library's own HNSW graph (built at the auto switch, then grown), searched through faiss directly
    hnsw_only = retriever.vectors.inner if stats.index_kind == "hnsw" else None
    assert hnsw_only is not None, "the auto switch to HNSW did not happen"
    report["build"] = build
    print("build:", json.dumps(build))

    tmp = Path(tempfile.mkdtemp(prefix="terse-bench-"))
    start = time.perf_counter()
    retriever.save(tmp / "index")
    report["save_s"] = time.perf_counter() - start
    report["disk_bytes"] = dir_bytes(tmp / "index")
    start = time.perf_counter()
    reopened = Retriever.open(tmp / "index", embedder=embedder)
    report["open_s"] = time.perf_counter() - start
    assert reopened.stats().num_chunks == args.num_chunks

    report["latency"] = {}
    for num_threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
        faiss.omp_set_num_threads(num_threads)
        report["latency"][f"omp_threads_{num_threads}"] = bench_latency(
            retriever, flat, hnsw_only, query_vectors, queries, config)
    report["hnsw_recall_sweep"] = bench_recall(hnsw_only, flat, query_vectors)
    report["machine"]["load_avg_end"] = os.getloadavg()
    shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print_tables(report)


def bench_latency(
    retriever: Any, flat: Any, hnsw: Any, query_vectors: np.ndarray, queries: list[str], config: Any
) -> dict[str, Any]:
    import faiss

    from terse.retrieval import Retriever

    num = len(queries)
    ef = int(retriever.vectors.ef_search) if retriever.vectors.kind == "hnsw" else 64
    params = faiss.SearchParametersHNSW()
    params.efSearch = ef
    out: dict[str, Any] = {"ef_search": ef}
    out["faiss_flat"] = percentiles_ms(time_each(lambda i: flat.search(query_vectors[i : i + 1], 10), num))
    out["faiss_hnsw"] = percentiles_ms(
        time_each(lambda i: hnsw.search(query_vectors[i : i + 1], 10, params=params), num))
    for mode in ("dense", "bm25", "hybrid"):
        out[f"retriever_{mode}_{retriever.vectors.kind}"] = percentiles_ms(
            time_each(lambda i, m=mode: retriever.search(queries[i], 10, m), num))
    # the same library path over an exact index, for the dense and hybrid baselines
    exact = Retriever(config, embedder=retriever.embedder)
    exact.store, exact._bm25 = retriever.store, retriever._bm25
    from terse.retrieval.calibration import build_index

    ids, vectors = retriever.vectors.export()
    exact.vectors = build_index("flat", vectors.shape[1], config.index, ids, vectors)
    for mode in ("dense", "hybrid"):
        out[f"retriever_{mode}_flat"] = percentiles_ms(
            time_each(lambda i, m=mode: exact.search(queries[i], 10, m), num))
    print("latency:", json.dumps(out))
    return out


def bench_recall(hnsw: Any, flat: Any, query_vectors: np.ndarray) -> list[dict[str, Any]]:
    import faiss

    _, truth = flat.search(query_vectors, 10)
    sweep = []
    for ef in (16, 32, 64, 128, 256, 512):
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef
        _, found = hnsw.search(query_vectors, 10, params=params)
        recall = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
        lat = percentiles_ms(time_each(lambda i, p=params: hnsw.search(query_vectors[i : i + 1], 10, params=p),
                                       len(query_vectors)))
        sweep.append({"ef_search": ef, "recall_at_10": recall, **lat})
        print(f"  ef_search={ef}: recall@10 {recall:.3f}, p50 {lat['p50_ms']:.3f} ms", flush=True)
    return sweep


def print_tables(report: dict[str, Any]) -> None:
    emb = report["embedding"]
    print(f"\n| embedding (MiniLM, {emb['num_chunks']} chunks, {emb['mean_tokens_per_chunk']:.0f} tokens avg) | chunks/s |")
    print("|---|---|")
    for key, value in emb.items():
        if key.startswith("threads_"):
            print(f"| {key.replace('_', ' ')} | {value['chunks_per_s']:.1f} |")
    for threads, table in report["latency"].items():
        print(f"\n| search (batch 1, k=10), faiss {threads} | p50 ms | p99 ms |\n|---|---|---|")
        for key, value in table.items():
            if isinstance(value, dict):
                print(f"| {key} | {value['p50_ms']:.3f} | {value['p99_ms']:.3f} |")
    print("\n| HNSW efSearch (faiss omp 1) | recall@10 vs exact | p50 ms | p99 ms |\n|---|---|---|---|")
    for row in report["hnsw_recall_sweep"]:
        print(f"| {row['ef_search']} | {row['recall_at_10']:.3f} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} |")
    print("\nbuild:", json.dumps(report["build"]))
    print("disk bytes:", json.dumps(report["disk_bytes"]), "save s:", round(report["save_s"], 2),
          "open s:", round(report["open_s"], 2))


if __name__ == "__main__":
    main()
