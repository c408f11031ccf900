"""`terse compress`: compress files or stdin to a token budget; the text goes to stdout, stats to stderr.

    terse compress notes.txt --rate 0.25 --question "When did the launch slip?"
    cat a.txt b.txt | terse compress --target 300 --scorer hf:path/to/model --protect markdown
    terse compress doc1.md doc2.md --target 500 --ranker bm25 --pruner none --target-tokenizer DIR --json

Each file is one context; stdin (or "-") is one context. The scorer defaults to the bundled reference
model when it is installed. The budget is counted in `--target-tokenizer` (the model the prompt is for),
else in the scorer's tokenizer, else in words (an estimate, said so in the stats). Numbers (CJK
numerals too), dates, URLs, e-mail addresses and code are protected by default (`--no-protect KIND`,
`--no-default-protection`); `--protect` adds the other kinds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from terse.compress import ProtectionPolicy

_PROTECT_FLAGS = ("numbers", "code_blocks", "json_keys", "role_labels", "markdown", "dates", "urls", "emails")
_DEFAULT_PROTECT = ("numbers", "code_blocks", "dates", "urls", "emails")  # ProtectionPolicy.standard()
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
    parser.add_argument("--target-tokenizer", metavar="MODEL",
                        help="count the budget in this model's tokenizer (directory or hub name, offline)")
    parser.add_argument("--protect", action="append", default=[], choices=_PROTECT_FLAGS,
                        help="also keep these spans whole (repeatable; default: " + ", ".join(_DEFAULT_PROTECT) + ")")
    parser.add_argument("--no-protect", action="append", default=[], choices=_DEFAULT_PROTECT, metavar="KIND",
                        help="do not protect this default kind (repeatable): " + ", ".join(_DEFAULT_PROTECT))
    parser.add_argument("--no-default-protection", action="store_true",
                        help="protect nothing by default (only --protect, --keep, --keep-regex)")
    parser.add_argument("--keep", action="append", default=[], metavar="TEXT", help="literal kept whole (repeatable)")
    parser.add_argument("--keep-regex", action="append", default=[], metavar="RE", help="regex kept whole (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (text + stats) instead")


def _scorer_spec(args: argparse.Namespace) -> str | None:
    if args.scorer:
        return str(args.scorer)
    needs_lm = args.ranker == "lm" or args.pruner != "none"
    if args.target_tokenizer and not needs_lm:
        return None  # nothing to score, and the budget has its tokenizer
    if (_REFERENCE / "config.json").exists():
        return f"hf:{_REFERENCE}"
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


def protection_policy(args: argparse.Namespace) -> ProtectionPolicy:
    """The standard protections less `--no-protect` kinds (none with `--no-default-protection`),
    plus `--protect` kinds and the literals / regexes to keep."""
    from terse.compress import ProtectionPolicy

    defaults = () if args.no_default_protection else tuple(k for k in _DEFAULT_PROTECT if k not in args.no_protect)
    flags = {name: name in args.protect or name in defaults for name in _PROTECT_FLAGS}
    return ProtectionPolicy(tuple(args.keep), tuple(args.keep_regex), **flags)


def run(args: argparse.Namespace) -> int:
    from terse.backend.registry import load_backend
    from terse.compress import Budget, CompressorConfig, PromptCompressor
    from terse.compress.tokenizer import WordCountTarget, load_target_tokenizer
    from terse.errors import TerseError

    try:
        budget = Budget(rate=args.rate) if args.rate is not None else Budget(target_tokens=args.target)
        policy = protection_policy(args)
        config = CompressorConfig(
            ranker=None if args.ranker == "none" else args.ranker,
            token_pruner=None if args.pruner == "none" else args.pruner,
            reorder=args.reorder,
        )
        spec = _scorer_spec(args)
        contexts = _read(args.inputs)
        target = load_target_tokenizer(args.target_tokenizer) if args.target_tokenizer else None
        scorer = load_backend(spec) if spec else None
        try:
            counter = target or (None if scorer is not None else WordCountTarget())
            compressor = PromptCompressor(scorer, counter, config)
            result = compressor.compress(
                contexts, budget=budget, question=args.question, instruction=args.instruction, protect=policy
            )
            unit = "tokens" if counter is None or counter is target else "words"
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
        "tokenizer": args.target_tokenizer or (spec if unit == "tokens" else "none: words counted as an estimate"),
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

