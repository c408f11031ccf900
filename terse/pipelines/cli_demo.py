"""`terse demo`: the doc-QA job over the bundled sample data with the embedded defaults.

Uses the shipped reference model on the local engine (the `hf:` backend when the engine is not
available), the offline MiniLM embedder, retrieval + compression, and prints the summary table.
Without bundled sample data it generates a small seeded set with terse.synth. Answers go to
--out-dir; a rerun resumes there (--fresh starts over).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from terse.pipelines.cli_docqa import add_pipeline_arguments

    parser.add_argument("--out-dir", type=Path, default=Path("terse-demo"),
                        help="where answers, failures and the summary go (default ./terse-demo)")
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo answers first")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="answer only the first N questions")
    add_pipeline_arguments(parser)


def default_backend() -> str:
    """`local:<reference model>` when the engine imports, else `hf:<reference model>`."""
    from terse.errors import ConfigError
    from terse.pipelines.docqa.sample import reference_model_dir

    model = reference_model_dir()
    if model is None:
        raise ConfigError("this installation has no bundled reference model; pass a model with "
                          "--backend local:<model dir> (or hf:<dir>, openai:<url>#<model>)")
    try:
        import terse.backend.local.engine  # noqa: F401
    except ImportError:
        return f"hf:{model}"
    return f"local:{model}"


def demo_inputs(out_dir: Path, limit: int | None) -> tuple[Path, Path]:
    """(documents, questions file): the bundled sample, else a generated one; cut to `limit` questions."""
    from terse.pipelines.docqa.sample import bundled_sample, write_synthetic

    found = bundled_sample()
    docs, questions = found if found is not None else write_synthetic(out_dir / "data")
    if limit is not None:
        lines = [x for x in questions.read_text(encoding="utf-8").splitlines() if x.strip()][:limit]
        questions = out_dir / "questions.jsonl"
        questions.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return docs, questions


def run(args: argparse.Namespace) -> int:
    from terse.pipelines.cli_docqa import run_naming_flags

    return run_naming_flags("demo", _run, args)


def _run(args: argparse.Namespace) -> int:
    from terse.pipelines.cli_docqa import config_from_args, print_summary, run_with_progress
    from terse.pipelines.docqa.job import DocQAJob, JobPaths

    if args.fresh and args.out_dir.exists():
        shutil.rmtree(args.out_dir)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    docs, questions = demo_inputs(args.out_dir, args.limit)
    config = config_from_args(args)
    if not config.backend:
        config = config.with_overrides(backend=default_backend())
    print(f"terse demo: {config.backend} over {docs} ({questions})", file=sys.stderr)
    paths = JobPaths(questions, (docs,), args.out_dir / "answers.jsonl")
    summary = run_with_progress(DocQAJob(config, paths), config.run.progress, args)
    print_summary(summary, paths)
    return 0 if summary.num_answered == summary.num_questions else 1
