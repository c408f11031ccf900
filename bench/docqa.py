"""terse's default doc-QA pipeline against the naive job, same model, same questions, same run.

naive: every document of the question pasted whole, no retrieval, no compression, one question per
       call and one call at a time, prefix cache off (the engine is built with enable_prefix_cache=False).
terse: the default DocQAConfig (context-size routing, question-aware compression to 240 tokens,
       shared-prefix-first prompts, 16 questions per batch, prefix cache on).

Both answer the synthetic doc-QA benchmark (terse.synth, test split: single-hop, multi-hop and list
questions, each over ~`--context-tokens` of documents: gold documents among distractors) greedily
with the same stop strings and max tokens. "answer kept" is the share of questions whose gold answer
still occurs in the document text their prompt was built from (what compression preserved, whatever
the model makes of it). Wall time is the whole job (reading inputs, preparing
prompts, generating, writing answers); models are loaded and warmed up beforehand. Medians of
`--repeats` runs, each run into a fresh answers file, after `--warmup-runs` untimed runs of each
variant (each run in its own process).

    .venv/bin/python bench/docqa.py                         # the shipped reference model, local engine
    .venv/bin/python bench/docqa.py --model DIR --scheme hf
    .venv/bin/python bench/docqa.py --random-shape 1b      # random weights of a shape, reference tokenizer:
                                                           # timings only (accuracy is meaningless)
    python bench/docqa.py --random-shape 8b --num-worlds 2 --questions-per-kind 10   # GPU: Llama-3-8B shape
        (head_dim 128, untied embeddings), built on the device by the local engine (no checkpoint)

terse's wall time is split into preparation the generation waited for ("prepare"), preparation that
ran while the backend generated ("prepare overlapped": on worker processes, or in process with the next
batch submitted ahead) and waiting for answers ("generate"; `DocQAJob.stage_seconds`).

Prints a table last and writes raw numbers to bench/results/docqa_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Heavy imports live inside the functions: the doc-QA job starts its preparation workers with
# "spawn", which re-imports this file in each worker, and they need none of torch.
from terse.pipelines.docqa import DocQAConfig, DocQAJob, JobPaths, JobSummary
from terse.pipelines.docqa.sample import REFERENCE_MODEL_DIR, reference_model_dir, write_synthetic

if TYPE_CHECKING:
    from terse.backend.base import Backend

# Random-weight shapes for timing runs: (hidden, intermediate, layers, heads, kv heads)
SHAPES = {"reference": (256, 640, 8, 8, 2), "1b": (2048, 8192, 16, 32, 8), "8b": (4096, 14336, 32, 32, 8)}
ON_DEVICE = ("8b",)  # built on the device by the local engine (head_dim 128, untied embeddings): no checkpoint


def random_model(directory: Path, shape: str) -> Path:
    """A random Llama of `shape` with the reference tokenizer (timings only: its answers are noise)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def on_device_model(shape: str, prefix_cache: bool) -> Backend:
    """A local engine over random weights of `shape` built on the device, reference tokenizer."""
    from transformers import AutoTokenizer

    from terse.backend.local.config import EngineConfig
    from terse.backend.local.engine import LocalEngine
    from terse.backend.local.models.llama import ModelConfig

    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    config = ModelConfig.from_hf_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": len(tok), "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
    })
    return LocalEngine.from_random(config, EngineConfig(enable_prefix_cache=prefix_cache), tokenizer=tok,
                                   name=f"random-{shape}")


def load(spec: str, scheme: str, prefix_cache: bool) -> Backend:
    from terse.backend.registry import load_backend
    from terse.backend.types import SamplingParams

    options: dict[str, Any] = {"enable_prefix_cache": prefix_cache} if scheme == "local" else {}
    if spec.startswith("random-on-device:"):
        backend = on_device_model(spec.split(":", 1)[1], prefix_cache)
    else:
        backend = load_backend(spec, **options)
    backend.generate([backend.render_chat([{"role": "user", "content": "warm up " * 50}])],
                     SamplingParams(max_tokens=4))
    return backend


def one_run(config: DocQAConfig, scheme: str, prefix_cache: bool, paths: JobPaths
            ) -> tuple[JobSummary, float, dict[str, float]]:
    """One timed job on a freshly loaded backend (runs in its own process, see `run_job`)."""
    backend = load(config.backend, scheme, prefix_cache)
    t0 = time.perf_counter()
    job = DocQAJob(config, paths, backend=backend)
    summary = job.run()
    wall = time.perf_counter() - t0
    backend.close()
    return summary, wall, dict(getattr(job, "stage_seconds", {}))


def run_job(config: DocQAConfig, scheme: str, prefix_cache: bool, docs: Path, questions: Path, workdir: Path,
            name: str, repeats: int, warmup_runs: int = 0) -> tuple[JobSummary, list[float], list[dict[str, float]]]:
    """`repeats` runs, each in a fresh process on a freshly loaded backend: no run reuses an earlier
    run's prefix cache, and none inherits the device state (memory, captured graphs) of another.
    `warmup_runs` untimed runs go first, also each in a fresh process: they leave nothing in memory,
    only what a machine keeps on disk after running the job once (compiled kernels in Triton's and
    torch's caches)."""
    walls: list[float] = []
    stages: list[dict[str, float]] = []
    summary = None
    spawn = multiprocessing.get_context("spawn")
    for w in range(warmup_runs):
        paths = JobPaths(questions, (docs,), workdir / f"{name}-warmup-{w}.jsonl")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            _, wall, _ = pool.submit(one_run, config, scheme, prefix_cache, paths).result()
        print(f"  {name} warm-up run {w + 1}/{warmup_runs}: {wall:.2f} s (not counted)", file=sys.stderr)
    for r in range(repeats):
        paths = JobPaths(questions, (docs,), workdir / f"{name}-{r}.jsonl")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            summary, wall, split = pool.submit(one_run, config, scheme, prefix_cache, paths).result()
        walls.append(wall)
        stages.append(split)
        if summary.num_failed:
            # a run with failed questions is not a benchmark: show why and stop
            errors = [json.loads(line) for line in paths.failures.read_text().splitlines()]
            distinct = {f"{e['error_type']}: {e['error']}" for e in errors}
            sys.exit(f"{name}: {summary.num_failed} questions failed; errors:\n" + "\n".join(sorted(distinct)[:5]))
        print(f"  {name} run {r + 1}/{repeats}: {walls[-1]:.2f} s, accuracy {summary.accuracy}, "
              f"stages {({k: round(v, 3) for k, v in split.items()})}", file=sys.stderr)
    assert summary is not None
    return summary, walls, stages


def answer_kept_rate(answers: Path, docs: Path, questions: Path) -> float:
    """Share of questions whose gold answer (every gold item, for lists) occurs in the document text the
    prompt was built from (its `sources`): what compression preserved, whatever the model then does."""
    corpus = {d["id"]: d["text"] for d in map(json.loads, docs.read_text().splitlines())}
    gold = {q["id"]: q for q in map(json.loads, questions.read_text().splitlines())}
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    kept = 0
    for r in records:
        text = " ".join(corpus[s["doc_id"]][s["char_start"]:s["char_end"]] for s in r["sources"]).lower()
        q = gold[r["id"]]
        kept += all(item.lower() in text for item in (q.get("items") or [q["answer"]]))
    return kept / len(records)


def row(name: str, s: JobSummary, wall: float, kept: float) -> dict[str, Any]:
    return {"variant": name, "questions": s.num_questions, "answered": s.num_answered, "accuracy": s.accuracy,
            "answer_kept_rate": kept,
            "prompt_tokens": s.prompt_tokens, "original_prompt_tokens": s.original_prompt_tokens,
            "cached_tokens": s.cached_tokens, "completion_tokens": s.completion_tokens,
            "wall_s_median": wall, "questions_per_s": s.num_questions / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: the shipped reference model)")
    p.add_argument("--scheme", choices=["local", "hf"], default="local", help="backend: terse engine or transformers")
    p.add_argument("--random-shape", choices=sorted(SHAPES), help="random weights of this shape (timings only)")
    p.add_argument("--num-worlds", type=int, default=1)
    p.add_argument("--questions-per-kind", type=int, default=6)
    p.add_argument("--context-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup-runs", type=int, default=0,
                   help="untimed runs of each variant first, each in its own process (fills the on-disk kernel "
                        "compile caches as on a machine that has run the job before)")
    p.add_argument("--label", default=None)
    p.add_argument("--also-in-process", action="store_true",
                   help="also time terse with preparation in the main process (prepare_processes = 0)")
    p.add_argument("--also-one-batch-at-a-time", action="store_true",
                   help="also run terse's job with run.submit_ahead off (each batch collected before the next is sent)")
    p.add_argument("--prepare-processes", default="auto",
                   help='terse job: worker processes that compress ("auto": half the cores up to 8, 0 below 4)')
    args = p.parse_args()
    import torch
    import transformers

    import terse

    workdir = Path(tempfile.mkdtemp(prefix="terse-bench-docqa-"))
    if args.random_shape in ON_DEVICE:
        if args.scheme != "local":
            sys.exit(f"--random-shape {args.random_shape} is built by the local engine: use --scheme local")
        model, label = Path(f"random-{args.random_shape}"), f"random-{args.random_shape}"
    elif args.random_shape:
        model, label = random_model(workdir / "model", args.random_shape), f"random-{args.random_shape}"
    else:
        model = args.model or reference_model_dir()
        if model is None:
            sys.exit("no reference model in this checkout: pass --model DIR or --random-shape NAME")
        label = "reference" if args.model is None else Path(model).name
    label = args.label or f"{label}-{args.scheme}"
    docs, questions = write_synthetic(workdir / "data", num_worlds=args.num_worlds,
                                      questions_per_kind=args.questions_per_kind, context_tokens=args.context_tokens)
    spec = f"random-on-device:{args.random_shape}" if args.random_shape in ON_DEVICE else f"{args.scheme}:{model}"
    generation = {"max_tokens": args.max_tokens}
    naive_config = DocQAConfig(backend=spec).with_overrides(
        retrieval={"enabled": False}, compression={"enabled": False}, generation=generation,
        run={"batch_size": 1, "submit_ahead": False, "progress": False})
    processes: int | str = args.prepare_processes if args.prepare_processes == "auto" else int(args.prepare_processes)
    terse_config = DocQAConfig(backend=spec).with_overrides(
        generation=generation, run={"progress": False, "prepare_processes": processes})

    naive, naive_walls, _ = run_job(naive_config, args.scheme, False, docs, questions, workdir, "naive", args.repeats,
                                      args.warmup_runs)
    ours, terse_walls, terse_stages = run_job(terse_config, args.scheme, True, docs, questions, workdir, "terse",
                                              args.repeats, args.warmup_runs)

    rows = [
        row("naive", naive, statistics.median(naive_walls), answer_kept_rate(workdir / "naive-0.jsonl", docs, questions)),
        row("terse default", ours, statistics.median(terse_walls),
            answer_kept_rate(workdir / "terse-0.jsonl", docs, questions)),
    ]
    extra: dict[str, Any] = {}
    if args.also_in_process:
        in_process = terse_config.with_overrides(run={"prepare_processes": 0})
        one, one_walls, one_stages = run_job(in_process, args.scheme, True, docs, questions, workdir,
                                             "terse-in-process", args.repeats)
        rows.append(row("terse, prep in process", one, statistics.median(one_walls),
                        answer_kept_rate(workdir / "terse-in-process-0.jsonl", docs, questions)))
        extra = {"walls_s_in_process": one_walls, "stage_seconds_in_process": one_stages}
    if args.also_one_batch_at_a_time:
        sequential = terse_config.with_overrides(run={"submit_ahead": False})
        seq, seq_walls, seq_stages = run_job(sequential, args.scheme, True, docs, questions, workdir,
                                             "terse-one-batch-at-a-time", args.repeats, args.warmup_runs)
        rows.append(row("terse, one batch at a time", seq, statistics.median(seq_walls),
                        answer_kept_rate(workdir / "terse-one-batch-at-a-time-0.jsonl", docs, questions)))
        extra.update(walls_s_one_batch_at_a_time=seq_walls, stage_seconds_one_batch_at_a_time=seq_stages)
    result = {
        "label": label, "model": str(model), "backend": spec,
        "hardware": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"terse": terse.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "workload": {"num_worlds": args.num_worlds, "questions_per_kind": args.questions_per_kind,
                     "context_tokens": args.context_tokens, "max_tokens": args.max_tokens, "repeats": args.repeats, "warmup_runs": args.warmup_runs},
        "terse_config": terse_config.to_dict(), "rows": rows,
        "walls_s": {"naive": naive_walls, "terse": terse_walls},
        "terse_stage_seconds": terse_stages, **extra,
        "token_reduction": naive.prompt_tokens / max(1, ours.prompt_tokens),
        "speedup": statistics.median(naive_walls) / statistics.median(terse_walls),
    }
    out = Path(__file__).parent / "results" / f"docqa_{label}.json"
    # Paths inside the repository are written relative to its root.
    root = str(Path(__file__).resolve().parent.parent) + "/"
    # ... and the scratch directory (a random model's home) by a placeholder
    out.write_text(json.dumps(result, indent=2).replace(root, "").replace(str(workdir), "<scratch>") + "\n")

    print(f"\n{label}: {naive.num_questions} questions, {spec}, median of {args.repeats} runs ({out})")
    print(f"{'variant':<24} {'accuracy':>9} {'answer kept':>12} {'tokens sent':>12} {'cached':>8} {'wall s':>8} "
          f"{'q/s':>7}")
    for r in rows:
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
        print(f"{r['variant']:<24} {acc:>9} {r['answer_kept_rate']:>12.1%} {r['prompt_tokens']:>12,} "
              f"{r['cached_tokens']:>8,} {r['wall_s_median']:>8.2f} {r['questions_per_s']:>7.2f}")
    print(f"tokens: {result['token_reduction']:.2f}x fewer   wall time: {result['speedup']:.2f}x faster")
    median_run = sorted(zip(terse_walls, terse_stages))[len(terse_walls) // 2][1]
    if median_run:
        print("terse wall time split (median run): " + ", ".join(f"{k} {v:.2f} s" for k, v in median_run.items()))


if __name__ == "__main__":
    main()
