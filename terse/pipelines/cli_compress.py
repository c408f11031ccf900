"""`terse compress`: compress files or stdin to a token budget; the text goes to stdout, stats to stderr.

    terse compress notes.txt --rate 0.25 --question "When did the launch slip?"
    cat a.txt b.txt | terse compress --target 300 --scorer hf:path/to/model --protect numbers
    terse compress doc1.md doc2.md --target 500 --ranker bm25 --json    # one context per file

Each file is one context; stdin (or "-") is one context. The scorer defaults to the bundled reference
model when it is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

_PROTECT_FLAGS = ("numbers", "code_blocks", "json_keys", "role_labels", "markdown")
_REFERENCE = Path(__file__).resolve().parent.parent / "models" / "reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", default=["-"], help="files, one context each ('-' = stdin)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rate", type=float, help="keep this fraction of the contexts' tokens, in (0, 1]")
    size.add_argument("--target", type=int, help="most tokens of the whole compressed prompt")
    parser.add_argument("--question", default="", help="question to condition on (kept verbatim, last)")
    parser.add_argument("--instruction", default="", help="instruction kept verbatim, first")
    parser.add_argument("--scorer", help="scoring backend spec, e.g. hf:path/to/model (default: reference model)")
    parser.add_argument("--ranker", default="bm25", choices=["bm25", "lm", "embedding", "none"],
                        help="coarse context ranker (default bm25)")
    parser.add_argument("--pruner", default="parallel", choices=["parallel", "iterative", "none"],
                        help="token-level stage (default parallel)")
    parser.add_argument("--reorder", default="rank", choices=["original", "rank", "ends"],
                        help="output order of contexts (default rank)")
    parser.add_argument("--protect", action="append", default=[], choices=_PROTECT_FLAGS,
                        help="structural spans never cut (repeatable)")
    parser.add_argument("--keep", action="append", default=[], metavar="TEXT", help="literal kept whole (repeatable)")
    parser.add_argument("--keep-regex", action="append", default=[], metavar="RE", help="regex kept whole (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (text + stats) instead")


def _scorer_spec(args: argparse.Namespace) -> str | None:
    if args.scorer:
        return str(args.scorer)
    if (_REFERENCE / "config.json").exists():
        return f"hf:{_REFERENCE}"
    needs_lm = args.ranker == "lm" or args.pruner != "none"
    if needs_lm:
        raise SystemExit(
            "terse compress: no reference model is installed; pass --scorer hf:<model dir>, "
            "or use --ranker bm25 --pruner none for scorer-free compression"
        )
    return None


def _read(inputs: list[str]) -> list[str]:
    texts = []
    for name in inputs:
        if name == "-":
            texts.append(sys.stdin.read())
        else:
            try:
                texts.append(Path(name).read_text(encoding="utf-8"))
            except OSError as e:
                raise SystemExit(f"terse compress: cannot read {name!r}: {e.strerror}") from e
    return texts


def run(args: argparse.Namespace) -> int:
    from terse.backend.registry import load_backend
    from terse.compress import Budget, CompressorConfig, PromptCompressor, ProtectionPolicy
    from terse.errors import TerseError

    try:
        budget = Budget(rate=args.rate) if args.rate is not None else Budget(target_tokens=args.target)
        flags = {name: name in args.protect for name in _PROTECT_FLAGS}
        policy = ProtectionPolicy(tuple(args.keep), tuple(args.keep_regex), **flags)
        config = CompressorConfig(
            ranker=None if args.ranker == "none" else args.ranker,
            token_pruner=None if args.pruner == "none" else args.pruner,
            reorder=args.reorder,
        )
        spec = _scorer_spec(args)
        contexts = _read(args.inputs)
        scorer = load_backend(spec) if spec else None
        try:
            counter = None if scorer is not None else _fallback_counter()
            compressor = PromptCompressor(scorer, counter, config)
            result = compressor.compress(
                contexts, budget=budget, question=args.question, instruction=args.instruction, protect=policy
            )
            unit = "tokens" if scorer is not None else "words"
        finally:
            if scorer is not None:
                scorer.close()
    except TerseError as e:
        print(f"terse compress: {e}", file=sys.stderr)
        return 2
    stats = {
        "original_tokens": result.num_original_tokens,
        "compressed_tokens": result.num_compressed_tokens,
        "target_tokens": result.target_tokens,
        "unit": unit,
        "ratio": round(result.ratio, 3),
        "context_order": list(result.context_order),
        "contexts": [
            {"index": r.index, "rank": r.rank, "score": r.score, "kept_ratio": round(r.kept_ratio, 3)}
            for r in result.reports
        ],
        "seconds": {k: round(v, 4) for k, v in result.timings.items()},
    }
    if args.json:
        print(json.dumps({"text": result.text, **stats}, ensure_ascii=False))
    else:
        print(result.text)
        print(
            f"{result.num_original_tokens} -> {result.num_compressed_tokens} {unit} "
            f"(target {result.target_tokens}, {result.ratio:.2f}x) in {result.timings['total']:.2f} s",
            file=sys.stderr,
        )
    return 0


def _fallback_counter() -> Callable[[str], int]:
    """Without any model the budget counts words (CJK characters singly): a stated approximation."""
    from terse.compress.words import split_words

    return lambda text: len(split_words(text))
