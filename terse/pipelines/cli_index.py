"""`terse index <docs...> -o <dir>`: build or incrementally update a retrieval index.

An existing index at `-o` is reopened with its recorded settings: new documents are added, changed
ones (by content hash) re-embedded, unchanged ones skipped, and documents read before from under the
given paths whose files are gone are removed (unless --keep-missing). A file keeps one document id
however its path is spelled. The whole update holds the index's writer lock: a second `terse index`
of the same index waits for the first (or fails at once with --no-wait), so neither update is lost.
Progress goes to stderr, a summary to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from terse.retrieval import Retriever
    from terse.retrieval.embedder import ProgressFn
    from terse.retrieval.types import AddReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("docs", nargs="+", help="files or directories (.txt, .md, .jsonl with id+text, .pdf)")
    parser.add_argument("-o", "--output", required=True, help="index directory (created or updated)")
    parser.add_argument("--model", default=None, help="sentence-transformers name or path (default: bundled MiniLM)")
    parser.add_argument("--query-prompt", default=None, help="text prepended to queries (e.g. 'query: ')")
    parser.add_argument("--document-prompt", default=None, help="text prepended to chunks (e.g. 'passage: ')")
    parser.add_argument("--chunk-tokens", type=int, default=200, help="token budget per chunk (default 200)")
    parser.add_argument("--overlap-tokens", type=int, default=32, help="overlap between chunks (default 32)")
    parser.add_argument(
        "--index-kind", choices=["auto", "flat", "hnsw", "ivf"], default="auto", help="vector index (default auto)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="texts per embedding batch (default 64)")
    parser.add_argument("--device", default="cpu", help="torch device for the embedder (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--keep-missing", action="store_true", help="keep documents whose files are gone (default: remove them)"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="fail at once if another writer holds the index (default: wait)"
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from terse.errors import TerseError
    from terse.retrieval.lock import IndexLock

    output = Path(args.output)
    bar = tqdm(total=0, unit="chunk", desc="embedding", disable=args.no_progress, file=sys.stderr)

    def progress(num_done: int, num_total: int) -> None:
        bar.total = num_total
        bar.update(num_done - bar.n)

    def waiting(message: str) -> None:
        print(f"terse index: {message} (--no-wait fails instead)", file=sys.stderr, flush=True)

    try:
        with IndexLock(output, wait=not args.no_wait, on_wait=waiting):
            retriever, report = _update(args, output, progress)
    except (TerseError, OSError) as e:  # OSError: the disk filled up or the index became unwritable mid-save
        bar.close()
        print(f"terse index: error: {e}", file=sys.stderr)
        return 2
    bar.close()
    _print_summary(output, retriever, report)
    return 0


def _update(args: argparse.Namespace, output: Path, progress: ProgressFn) -> tuple[Retriever, AddReport]:
    """Open (or create) the index, add the paths, save. The caller holds the index's lock."""
    from terse.retrieval import ChunkerConfig, EmbedderConfig, IndexConfig, Retriever, RetrieverConfig
    from terse.retrieval.persistence import current_version

    if current_version(output) is not None:
        retriever = Retriever.open(output)
    else:
        config = RetrieverConfig(
            chunker=ChunkerConfig(args.chunk_tokens, args.overlap_tokens),
            embedder=EmbedderConfig(
                **({"model": args.model} if args.model else {}),
                query_prompt=args.query_prompt,
                document_prompt=args.document_prompt,
                batch_size=args.batch_size,
                device=args.device,
            ),
            index=IndexConfig(kind=args.index_kind),
        )
        retriever = Retriever(config)
    report = retriever.add_paths(args.docs, progress, remove_missing=not args.keep_missing)
    retriever.save(output)
    return retriever, report


def _print_summary(output: Path, retriever: Retriever, report: AddReport) -> None:
    stats = retriever.stats()
    recall = ""
    if stats.recall is not None and stats.recall.kind != "flat":  # flat is exact: nothing to report
        recall = f", {stats.recall.kind} recall@{stats.recall.k} vs exact {stats.recall.recall:.3f}"
        if stats.recall.kind != stats.index_kind:
            recall += " (below the floor: kept exact search)"
    print(
        f"indexed {output}: {report.num_added} added, {report.num_updated} updated, {report.num_unchanged} "
        f"unchanged; {report.num_chunks_added} chunks embedded, {report.num_chunks_removed} removed; "
        f"{stats.num_documents} documents, {stats.num_chunks} chunks, {stats.index_kind} index{recall}"
    )
    if report.removed_doc_ids:
        gone = report.removed_doc_ids
        shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
        print(f"removed {len(gone)} document(s) whose files are gone: {shown}")
