"""`terse docqa`: answer a file of questions over a folder of documents, resumably.

    terse docqa --docs docs/ --questions questions.jsonl --out answers.jsonl --backend local:model/

Flags override the config file (`--config job.toml`), which overrides the defaults. A rerun with the
same --out skips questions already answered and retries failed ones. Exit status: 0 when every
question is answered, 1 when some failed or are pending (rerun to retry), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--docs", nargs="+", type=Path, metavar="PATH",
                    help="document folders / files (.txt .md .jsonl .pdf) or one saved index directory")
    io.add_argument("--questions", type=Path, help="questions JSONL: {id, question, doc_ids?, answer?}")
    io.add_argument("--batch-input", type=Path, metavar="FILE",
                    help="read questions from an OpenAI Batch JSONL file instead of --questions")
    io.add_argument("--out", type=Path, help="answers JSONL (appended; failures and summary beside it)")
    io.add_argument("--batch-output", type=Path, metavar="FILE",
                    help="also write the answers in the OpenAI Batch output format")
    add_pipeline_arguments(parser)
    scale = parser.add_argument_group("scale-out")
    scale.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run on Ray Data: a cluster address, or no value for a local cluster")
    scale.add_argument("--ray-actors", type=int, default=None, metavar="N", help="generation actors (default 1)")
    scale.add_argument("--gpus-per-actor", type=float, default=None, metavar="G",
                       help="GPUs each actor requests (default 0 on CPU, 1 when the cluster has GPUs)")


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `terse docqa` and `terse demo` (each overrides the config file)."""
    p = parser.add_argument_group("pipeline (override the config file)")
    p.add_argument("--config", type=Path, help="job config file (.toml or .json)")
    p.add_argument("--backend", help="backend spec: local:<dir>, hf:<dir>, openai:<url>#<model>")
    p.add_argument("--no-retrieval", action="store_true", help="paste whole documents instead of top-k chunks")
    p.add_argument("--top-k", type=int, help="chunks per question")
    p.add_argument("--index-dir", help="persist / reuse the retrieval index here")
    p.add_argument("--no-compression", action="store_true", help="send passages uncompressed")
    p.add_argument("--budget", type=int, metavar="TOKENS", help="compression budget (passages + question)")
    p.add_argument("--organize", choices=["off", "sot", "dag", "auto"], help="answer organization")
    p.add_argument("--max-tokens", type=int, help="most tokens per answer")
    p.add_argument("--batch-size", type=int, help="questions generated together")
    p.add_argument("--runner", choices=["auto", "batch", "async"], help="how prompts reach the backend")
    p.add_argument("--concurrency", type=int, help="async runner: requests in flight")
    p.add_argument("--rps", type=float, help="async runner: most requests started per second")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace, base: Any = None) -> Any:
    """The job config: defaults (or `base`) < config file < flags."""
    from terse.pipelines.docqa.config import DocQAConfig, load_config

    config = load_config(args.config) if args.config else (base or DocQAConfig())
    sections: dict[str, dict[str, Any]] = {"retrieval": {}, "compression": {}, "organize": {},
                                           "generation": {}, "run": {}}
    flags = [
        ("retrieval", "enabled", False if args.no_retrieval else None),
        ("retrieval", "top_k", args.top_k),
        ("retrieval", "index_dir", args.index_dir),
        ("compression", "enabled", False if args.no_compression else None),
        ("organize", "mode", args.organize),
        ("generation", "max_tokens", args.max_tokens),
        ("run", "batch_size", args.batch_size),
        ("run", "runner", args.runner),
        ("run", "concurrency", args.concurrency),
        ("run", "requests_per_s", args.rps),
        ("run", "progress", False if args.no_progress else None),
    ]
    for section, name, value in flags:
        if value is not None:
            sections[section][name] = value
    if args.budget is not None:
        sections["compression"].update(target_tokens=args.budget, rate=None)
    overrides: dict[str, Any] = {k: v for k, v in sections.items() if v}
    if args.backend:
        overrides["backend"] = args.backend
    return config.with_overrides(**overrides) if overrides else config


def run(args: argparse.Namespace) -> int:
    from terse.errors import TerseError

    try:
        return _run(args)
    except TerseError as e:
        print(f"terse docqa: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from terse.errors import ConfigError
    from terse.pipelines.docqa.job import DocQAJob, JobPaths

    if not args.docs or not args.out or not (args.questions or args.batch_input):
        raise ConfigError("give --docs, --out and one of --questions / --batch-input")
    questions = args.questions
    if args.batch_input is not None:
        from terse.pipelines.docqa.openai_batch import convert_batch_input

        questions = convert_batch_input(args.batch_input, args.out.with_name(args.out.stem + ".questions.jsonl"))
    config = config_from_args(args)
    paths = JobPaths(questions, tuple(args.docs), args.out)
    job = DocQAJob(config, paths)
    summary = run_with_progress(job, config.run.progress, args)
    if args.batch_output is not None:
        from terse.pipelines.docqa.openai_batch import write_batch_output

        write_batch_output(paths.output, args.batch_output, model=config.backend)
    print_summary(summary, paths)
    return 0 if summary.num_answered == summary.num_questions else 1


def run_with_progress(job: Any, show: bool, args: argparse.Namespace) -> Any:
    """Run `job` (on Ray when --ray was given) with a tqdm bar showing rate and ETA on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="q", desc="docqa", disable=not show, file=sys.stderr, dynamic_ncols=True)

    def on_start(num_pending: int) -> None:
        bar.reset(total=num_pending)

    batch_fn = None
    if getattr(args, "ray", None) is not None:
        from terse.pipelines.docqa.ray_job import RayOptions, ray_batches

        options = RayOptions(address=None if args.ray == "local" else args.ray,
                             num_actors=args.ray_actors or 1, num_gpus_per_actor=args.gpus_per_actor)
        batch_fn = ray_batches(job, options)
    try:
        return job.run(progress=bar.update, batch_fn=batch_fn, on_start=on_start)
    finally:
        bar.close()


def print_summary(summary: Any, paths: Any) -> None:
    """The summary as a rich table on stdout, with where the files are."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="terse docqa", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for label, value in summary.rows():
        table.add_row(label, value)
    console = Console()
    console.print(table)
    console.print(f"answers: {paths.output}   failures: {paths.failures}   summary: {paths.summary}")
    if summary.stopped_reason:
        console.print(f"[red]stopped early:[/red] {summary.stopped_reason}")
    elif summary.num_failed:
        console.print(f"[yellow]{summary.num_failed} question(s) failed[/yellow]: see {paths.failures}; "
                      f"rerun the same command to retry them")
