"""`terse search <dir> "query" [-k] [--mode]`: print the best chunks of a saved index."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", help="index directory written by `terse index`")
    parser.add_argument("query", help="the search query")
    parser.add_argument("-k", type=int, default=5, help="number of hits (default 5)")
    parser.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default="hybrid", help="default hybrid")
    parser.add_argument("--doc-id", action="append", default=None, help="only search this document (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON object per hit instead of text")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from terse.errors import TerseError
    from terse.retrieval import Retriever

    try:
        retriever = Retriever.open(args.index)
        hits = retriever.search(args.query, k=args.k, mode=args.mode, doc_ids=args.doc_id)
    except TerseError as e:
        print(f"terse search: error: {e}", file=sys.stderr)
        return 2
    for rank, hit in enumerate(hits, start=1):
        if args.json:
            print(json.dumps({"rank": rank, **asdict(hit)}, ensure_ascii=False))
            continue
        ranks = f"dense #{hit.dense_rank or '-'}, bm25 #{hit.bm25_rank or '-'}"
        text = " ".join(hit.text.split())
        print(f"{rank}. {hit.doc_id} [{hit.char_start}:{hit.char_end}] score {hit.score:.4f} ({ranks})")
        print(f"   {text[:300]}{'...' if len(text) > 300 else ''}")
    if not hits:
        print("no hits")
    return 0
