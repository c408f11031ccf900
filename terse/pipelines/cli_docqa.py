"""`terse docqa`: answer a file of questions over a folder of documents, resumably.

    terse docqa --docs docs/ --questions questions.jsonl --out answers.jsonl --backend local:model/

Without --backend (in flags or the config file) the bundled reference model answers, as in `terse demo`.
Flags override the config file (`--config job.toml`), which overrides the defaults. A rerun with the
same --out skips questions already answered and retries failed ones. Exit status: 0 when every
question is answered, 1 when some failed or are pending (rerun to retry), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
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
    p.add_argument("--dispatch", "--runner", dest="dispatch", choices=["auto", "batch", "async"],
                   help="how prompts reach the backend (--runner: the earlier name)")
    p.add_argument("--concurrency", type=int, help="async dispatch: requests in flight")
    p.add_argument("--rps", type=float, help="async dispatch: most requests started per second")
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
        ("run", "dispatch", args.dispatch),
        ("run", "concurrency", args.concurrency),
        ("run", "requests_per_s", args.rps),
        ("run", "progress", False if args.no_progress else None),
    ]
    for section, name, value in flags:
        if value is not None:
            sections[section][name] = value
    if args.budget is not None:
        sections["compression"]["budget"] = {"target_tokens": args.budget}  # replaces a configured rate
    overrides: dict[str, Any] = {k: v for k, v in sections.items() if v}
    if args.backend:
        overrides["backend"] = args.backend
    return config.with_overrides(**overrides) if overrides else config


_FLAGS = {
    "retrieval.top_k": "--top-k", "retrieval.index_dir": "--index-dir", "compression.budget.target_tokens": "--budget",
    "generation.max_tokens": "--max-tokens", "run.batch_size": "--batch-size", "run.concurrency": "--concurrency",
    "run.requests_per_s": "--rps", "organize.mode": "--organize", "run.dispatch": "--dispatch",
}
"""Config fields set by a flag: an error about one names the flag too."""


def error_line(command: str, error: Exception) -> str:
    """One line for a configuration error, naming the flag behind a config field when there is one."""
    message = " ".join(str(error).split())
    for field, flag in _FLAGS.items():
        if message.startswith(f"{field}="):
            message = f"{flag} {message[len(field) + 1:]}"
            break
    return f"terse {command}: error: {message}"


def run_naming_flags(command: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`body(args)`; a `TerseError` becomes one stderr line (`error_line`) and exit status 2."""
    from terse.errors import TerseError

    try:
        return body(args)
    except TerseError as e:
        print(error_line(command, e), file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    return run_naming_flags("docqa", _run, args)


def _run(args: argparse.Namespace) -> int:
    from terse.errors import ConfigError
    from terse.pipelines.docqa.job import DocQAJob, JobPaths

    if not args.docs or not args.out or not (args.questions or args.batch_input):
        raise ConfigError("give --docs, --out and one of --questions / --batch-input")
    for path in [*args.docs, args.questions or args.batch_input]:
        if not path.exists():
            raise ConfigError(f"{str(path)!r} does not exist; check the path given to --docs / --questions")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {str(args.out)!r}: cannot create its folder ({e.strerror}); pick a writable path") from e
    questions = args.questions
    if args.batch_input is not None:
        from terse.pipelines.docqa.openai_batch import convert_batch_input

        questions = convert_batch_input(args.batch_input, args.out.with_name(args.out.stem + ".questions.jsonl"))
    config = config_from_args(args)
    if not config.backend:
        from terse.pipelines.cli_demo import default_backend

        config = config.with_overrides(backend=default_backend())
        print(f"terse docqa: no --backend given; answering with the bundled reference model ({config.backend})",
              file=sys.stderr)
    check_backend_spec(config.backend)
    paths = JobPaths(questions, tuple(args.docs), args.out)
    job = DocQAJob(config, paths)
    summary = run_with_progress(job, config.run.progress, args)
    if args.batch_output is not None:
        from terse.pipelines.docqa.openai_batch import write_batch_output

        write_batch_output(paths.output, args.batch_output, model=config.backend)
    print_summary(summary, paths)
    return 0 if summary.num_answered == summary.num_questions else 1


def check_backend_spec(spec: str) -> None:
    """Fail before any work for a spec that cannot load: unknown scheme, or a model path that is not there."""
    from terse.backend.registry import parse_spec
    from terse.errors import ConfigError

    scheme, target = parse_spec(spec)
    looks_like_path = target.startswith((".", "/", "~")) or target.count("/") > 1  # "org/name" may be a hub id
    if scheme in ("local", "hf") and looks_like_path and not Path(target).expanduser().is_dir():
        raise ConfigError(f"--backend {spec!r}: {target!r} is not a model directory; give a folder holding "
                          f"config.json and *.safetensors")


def run_with_progress(job: Any, show: bool, args: argparse.Namespace) -> Any:
    """Run `job` (on Ray when --ray was given) with a tqdm bar showing rate and ETA on stderr."""
    from tqdm import tqdm

    bars: list[Any] = []  # made once the job knows how many questions are pending: none for zero

    def on_start(num_pending: int) -> None:
        if show and num_pending:
            bars.append(tqdm(total=num_pending, unit="q", desc="docqa", file=sys.stderr, dynamic_ncols=True))

    def progress(num_done: int) -> None:
        for bar in bars:
            bar.update(num_done)

    batch_fn = None
    if getattr(args, "ray", None) is not None:
        from terse.pipelines.docqa.ray_job import RayOptions, ray_batches

        options = RayOptions(address=None if args.ray == "local" else args.ray,
                             num_actors=args.ray_actors or 1, num_gpus_per_actor=args.gpus_per_actor,
                             verbose=getattr(args, "verbose", False))
        batch_fn = ray_batches(job, options)
    quiet_ray = batch_fn is not None and not getattr(args, "verbose", False)
    ray_log = job.paths.output.with_name(job.paths.output.stem + ".ray.log")
    try:
        with native_stderr_to(ray_log) if quiet_ray else contextlib.nullcontext():
            try:
                return job.run(progress=progress, batch_fn=batch_fn, on_start=on_start)
            finally:
                for bar in bars:  # on the stream they were made for
                    bar.close()
    finally:
        if quiet_ray:
            print(f"terse docqa: Ray's own logs are in {ray_log} (--verbose shows them here)", file=sys.stderr)


@contextlib.contextmanager
def native_stderr_to(path: Path) -> Iterator[None]:
    """Send what native code and child processes write to file descriptor 2 (Ray's C++ core worker,
    raylet, workers) to `path`, while Python's `sys.stderr` (progress bar, messages) stays on the terminal."""
    sys.stderr.flush()
    terminal = os.dup(2)
    saved_stderr = sys.stderr
    sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, encoding=saved_stderr.encoding or "utf-8",
                           errors="backslashreplace")
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        os.dup2(terminal, 2)
        os.close(terminal)
        sys.stderr.close()
        sys.stderr = saved_stderr


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
    has_failures = paths.failures.exists() and paths.failures.stat().st_size > 0
    failures = f"   failures: {paths.failures}" if has_failures else ""
    console.print(f"answers: {paths.output}{failures}   summary: {paths.summary}", soft_wrap=True)
    if summary.stopped_reason:
        console.print(f"[red]stopped early:[/red] {summary.stopped_reason}")
    elif summary.num_failed:
        console.print(f"[yellow]{summary.num_failed} question(s) failed[/yellow]: see {paths.failures}; "
                      f"rerun the same command to retry them")
