"""The `terse` command line: one subcommand per module, imported only when it runs.

Each subcommand module defines `add_arguments(parser)` and `run(args) -> int`. Modules must keep their
top-level imports light (no torch) so `terse --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("terse.pipelines.cli_demo", "run the bundled demo job"),
    "compress": ("terse.pipelines.cli_compress", "compress files or stdin to a token budget (question-aware)"),
    "docqa": ("terse.pipelines.cli_docqa", "answer a file of questions over a folder of documents (resumable)"),
    "serve": ("terse.pipelines.cli_serve", "OpenAI-compatible server: local model or proxy to an upstream API"),
    "index": ("terse.pipelines.cli_index", "build or update a retrieval index from documents"),
    "search": ("terse.pipelines.cli_search", "search a retrieval index (dense, BM25 or hybrid)"),
    "sparse-patterns": ("terse.kernels.cli_patterns", "search per-head sparse prefill patterns for a model"),
    "quantize": ("terse.backend.local.quant.cli", "quantize a model's weights to INT4 and save the checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="terse", description="Make LLM applications cheaper and faster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args._module.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
