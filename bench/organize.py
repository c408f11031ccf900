"""Skeleton-of-Thought and DAG latency against their baselines, on any backend.

SoT: for 3..10 points, skeleton call + all expansions in one batch, vs ONE direct answer of the same
total length (points x point tokens). DAG: one synthetic plan per shape, waves batched vs the same
plan one step per call. Outputs have fixed lengths (`ignore_eos`), so both sides generate exactly the
same number of tokens. Each prompt carries a fresh nonce so no figure profits from an earlier one's
prefix cache; `cached_prompt_tokens` of the expansions shows the prefill prefix sharing saved.

    .venv/bin/python bench/organize.py --tiny llama --backend-scheme hf        # CPU, tiny random model
    .venv/bin/python bench/organize.py --backend local:/path/to/model          # GPU, a real model

Prints a table last and writes raw numbers to bench/results/organize_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import terse
from terse.backend.base import Backend
from terse.backend.types import SamplingParams
from terse.organize.calls import run_batch_call
from terse.organize.formats import PlanStep, qa_messages, skeleton_messages
from terse.organize.skeleton import SkeletonOfThought, SoTConfig

DOCUMENT = (
    "Acme Corp is a manufacturer of kitchen tools based in Lyon. It was founded in 1987 by Marie Dubois, "
    "who ran it until 2015. The company sells knives, pans and mixers in 40 countries and employs 2,300 "
    "people. Its largest plant, opened in 2004, makes 30,000 pans a week. In 2019 Acme bought Globex, "
    "a maker of blenders founded by Bob Martin in 1998. "
)
QUESTION = "What are the main steps Acme took to grow from a local workshop into a global company?"

# Shapes for --random-weights-shape (config.json fields); speed only, weights are random.
SHAPES: dict[str, dict[str, Any]] = {
    "8b": {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "bos_token_id": 1, "eos_token_id": 3, "tie_word_embeddings": False,
    },
}

PLANS: dict[str, list[PlanStep]] = {
    "wide-4": [PlanStep(i, f"What is fact {i} about Acme?", ()) for i in range(1, 5)],
    "diamond-4": [
        PlanStep(1, "Who founded Acme?", ()),
        PlanStep(2, "When was {Q1} born?", (1,)),
        PlanStep(3, "Where did {Q1} study?", (1,)),
        PlanStep(4, "Was {Q1} born in {Q3} in {Q2}?", (2, 3)),
    ],
    "two-chains-5": [
        PlanStep(1, "Who founded Acme?", ()),
        PlanStep(2, "Who founded Globex?", ()),
        PlanStep(3, "When was {Q1} born?", (1,)),
        PlanStep(4, "When was {Q2} born?", (2,)),
        PlanStep(5, "Who is older, {Q1} ({Q3}) or {Q2} ({Q4})?", (3, 4)),
    ],
    "chain-3": [
        PlanStep(1, "Who founded Acme?", ()),
        PlanStep(2, "Where was {Q1} born?", (1,)),
        PlanStep(3, "What is {Q2} known for?", (2,)),
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", help="backend spec, e.g. local:/models/llama-3-8b or hf:/models/x")
    p.add_argument("--tiny", metavar="ARCH", help="build a tiny random model of ARCH (llama, qwen2, ...) instead")
    p.add_argument("--tiny-hidden", type=int, default=256, help="hidden size of the --tiny model")
    p.add_argument("--tiny-layers", type=int, default=4, help="layers of the --tiny model")
    p.add_argument("--backend-scheme", default="hf", help="scheme used with --tiny (hf or local)")
    p.add_argument("--random-weights-shape", choices=sorted(SHAPES), help="local engine over random weights of "
                   "this shape (speed only; the tests' small tokenizer makes the text)")
    p.add_argument("--points", default="3,4,5,6,8,10", help="SoT point counts, comma-separated")
    p.add_argument("--point-tokens", type=int, default=32, help="tokens per point expansion")
    p.add_argument("--skeleton-tokens-per-point", type=int, default=6, help="skeleton tokens per point")
    p.add_argument("--step-tokens", type=int, default=16, help="tokens per DAG step answer and synthesis")
    p.add_argument("--doc-repeats", type=int, default=3, help="times DOCUMENT is repeated in the context")
    p.add_argument("--repeats", type=int, default=5, help="runs per figure (medians are reported; the "
                   "speedup is the median of per-run ratios, each run timing both sides back to back)")
    p.add_argument("--label", default=None, help="result file label (default: derived from the backend)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if sum(x is not None for x in (args.backend, args.tiny, args.random_weights_shape)) != 1:
        p.error("give exactly one of --backend SPEC, --tiny ARCH or --random-weights-shape SHAPE")
    return args


def make_backend(args: argparse.Namespace) -> tuple[Backend, str]:
    if args.backend:
        return terse.load_backend(args.backend), args.backend
    if args.random_weights_shape:
        from terse.backend.local.engine import LocalEngine
        from terse.backend.local.models.llama import ModelConfig
        from tests.tiny_models import train_tokenizer

        shape = SHAPES[args.random_weights_shape]
        engine = LocalEngine.from_random(ModelConfig.from_hf_dict(shape), tokenizer=train_tokenizer())
        return engine, f"random-weight {args.random_weights_shape} shape on the local engine"
    from tests.tiny_models import build_tiny_model

    path = build_tiny_model(
        Path(tempfile.mkdtemp(prefix="terse-bench-")), args.tiny,
        hidden_size=args.tiny_hidden, num_layers=args.tiny_layers, num_heads=4, num_kv_heads=2,
    )
    desc = f"tiny random {args.tiny} (hidden {args.tiny_hidden}, {args.tiny_layers} layers)"
    return terse.load_backend(f"{args.backend_scheme}:{path}"), desc


def contexts(nonce: str, doc_repeats: int) -> list[tuple[str, str]]:
    """The benchmark document, led by a nonce so that no run reuses another run's cached prefix
    (with `doc_repeats == 0` only the nonce, as a one-line document)."""
    return [("acme", f"(ref {nonce}) " + DOCUMENT * doc_repeats)]


def sot_once(backend: Backend, args: argparse.Namespace, num_points: int, nonce: str) -> dict[str, float]:
    docs = contexts(nonce, args.doc_repeats)
    fixed = SamplingParams(max_tokens=num_points * args.skeleton_tokens_per_point, ignore_eos=True)
    skeleton = run_batch_call(backend, "skeleton", [skeleton_messages(QUESTION, docs)], fixed)
    points = [f"Step {i + 1} of the growth" for i in range(num_points)]
    config = SoTConfig(point_params=SamplingParams(max_tokens=args.point_tokens, ignore_eos=True))
    expanded = SkeletonOfThought(backend, config).expand(QUESTION, docs, points)
    direct_params = SamplingParams(max_tokens=num_points * args.point_tokens, ignore_eos=True)
    direct = run_batch_call(backend, "direct", [qa_messages(QUESTION, contexts(nonce + "d", args.doc_repeats))],
                       direct_params)
    usage = expanded.usage
    return {
        "skeleton_s": skeleton.wall_s,
        "expand_s": expanded.critical_path_s,
        "sot_s": skeleton.wall_s + expanded.critical_path_s,
        "direct_s": direct.wall_s,
        "speedup": direct.wall_s / (skeleton.wall_s + expanded.critical_path_s),
        "expand_prompt_tokens": usage.prompt_tokens,
        "expand_cached_prompt_tokens": usage.cached_prompt_tokens,
        "sot_completion_tokens": usage.completion_tokens + skeleton.usage.completion_tokens,
        "direct_completion_tokens": direct.usage.completion_tokens,
    }


def dag_once(backend: Backend, args: argparse.Namespace, steps: list[PlanStep], nonce: str) -> dict[str, float]:
    from terse.organize.dag import DagConfig, DagDecomposition  # networkx: imported only for this part

    fixed = SamplingParams(max_tokens=args.step_tokens, ignore_eos=True)
    dag = DagDecomposition(backend, DagConfig(step_params=fixed, synthesis_params=fixed))
    start = time.perf_counter()
    waved = dag.execute(QUESTION, contexts(nonce + "w", args.doc_repeats), steps)
    waved_s = time.perf_counter() - start
    start = time.perf_counter()
    sequential = dag.execute(QUESTION, contexts(nonce + "s", args.doc_repeats), steps, batch_waves=False)
    sequential_s = time.perf_counter() - start
    return {
        "dag_s": waved_s,
        "sequential_s": sequential_s,
        "speedup": sequential_s / waved_s,
        "num_waves": len(waved.waves),
        "num_calls_dag": len(waved.calls),
        "num_calls_sequential": len(sequential.calls),
        "dag_prompt_tokens": waved.usage.prompt_tokens,
        "dag_cached_prompt_tokens": waved.usage.cached_prompt_tokens,
    }


def has_networkx() -> bool:
    try:
        import networkx  # noqa: F401
    except ModuleNotFoundError:
        print("networkx is not installed here: the DAG part is skipped")
        return False
    return True


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backend, model_desc = make_backend(args)
    point_counts = [int(x) for x in args.points.split(",")]
    sot_once(backend, args, 2, "warmup")  # first calls pay one-time costs (allocation, compilation)
    sot_rows = []
    for n in point_counts:
        runs = [sot_once(backend, args, n, f"sot-{n}-{r}-{time.time_ns()}") for r in range(args.repeats)]
        sot_rows.append({"num_points": n, **median_of(runs), "runs": runs})
    dag_rows = []
    for name, steps in PLANS.items() if has_networkx() else ():
        runs = [dag_once(backend, args, steps, f"dag-{name}-{r}-{time.time_ns()}") for r in range(args.repeats)]
        dag_rows.append({"plan": name, **median_of(runs), "runs": runs})
    backend.close()
    meta = environment(args, model_desc)
    label = args.label or (
        f"tiny-{args.tiny}" if args.tiny
        else f"random-{args.random_weights_shape}" if args.random_weights_shape
        else args.backend.split(":")[0]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / f"organize_{label}.json"
    out_path.write_text(json.dumps({"meta": meta, "sot": sot_rows, "dag": dag_rows}, indent=2))
    print(f"wrote {out_path}")
    print_tables(sot_rows, dag_rows, args)
    return 0


def environment(args: argparse.Namespace, model_desc: str) -> dict[str, Any]:
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    return {
        "command": " ".join(sys.argv),
        "model": model_desc,
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }


def print_tables(sot_rows: list[dict[str, Any]], dag_rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nSkeleton-of-Thought vs direct answer of the same length ({args.point_tokens} tokens per point)")
    print("| points | skeleton s | expand s | SoT s | direct s | speedup | expand prompt tok | cached |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sot_rows:
        print(f"| {r['num_points']} | {r['skeleton_s']:.3f} | {r['expand_s']:.3f} | {r['sot_s']:.3f} | "
              f"{r['direct_s']:.3f} | {r['speedup']:.2f}x | {r['expand_prompt_tokens']:.0f} | "
              f"{r['expand_cached_prompt_tokens']:.0f} |")
    print(f"\nDAG waves vs the same plan one step per call ({args.step_tokens} tokens per answer)")
    print("| plan | waves | calls (dag / seq) | DAG s | sequential s | speedup | prompt tok | cached |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in dag_rows:
        print(f"| {r['plan']} | {r['num_waves']:.0f} | {r['num_calls_dag']:.0f} / {r['num_calls_sequential']:.0f} | "
              f"{r['dag_s']:.3f} | {r['sequential_s']:.3f} | {r['speedup']:.2f}x | "
              f"{r['dag_prompt_tokens']:.0f} | {r['dag_cached_prompt_tokens']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
