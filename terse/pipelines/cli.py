"""The `terse` command line: one subcommand per module, imported only when it runs.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Modules must keep their
top-level imports light (no torch) so `terse --help` stays fast. A `TerseError` a subcommand raises is
printed as one line `terse <command>: error: ...` on stderr, exit status 2. Every subcommand takes
`--verbose`; without it, third-party progress bars, deprecation notices and info logs (transformers, Ray)
are kept off the terminal so what a person reads is terse's own output.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from terse.errors import TerseError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("terse.pipelines.cli_demo", "run the bundled demo job"),
    "compress": ("terse.pipelines.cli_compress", "compress files or stdin to a token budget (question-aware)"),
    "docqa": ("terse.pipelines.cli_docqa", "answer a file of questions over a folder of documents (resumable)"),
    "serve": ("terse.pipelines.cli_serve", "OpenAI-compatible server: local model or proxy to an upstream API"),
    "index": ("terse.pipelines.cli_index", "build or update a retrieval index from documents"),
    "search": ("terse.pipelines.cli_search", "search a retrieval index (dense, BM25 or hybrid)"),
    "sparse-patterns": ("terse.pipelines.cli_patterns", "search per-head sparse prefill patterns for a model"),
    "quantize": ("terse.pipelines.cli_quantize", "quantize a model's weights to INT4 and save the checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="terse", description="Make LLM applications cheaper and faster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.add_argument("--verbose", action="store_true",
                       help="also show third-party logs, warnings and progress bars (transformers, Ray)")
        p.set_defaults(_module=module)
    return parser


def quiet_libraries() -> None:
    """Keep third-party noise off the terminal; set before those libraries are imported (they read the
    environment once). Their errors still surface, as terse's typed errors or in the logs."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars too
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # already imported (terse used as a library): tell it directly
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_libraries()
    try:
        code: int = args._module.run(args)
    except TerseError as e:
        print(f"terse {args.command}: error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
