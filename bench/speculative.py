"""Speculative decoding (prompt lookup) against one-token decoding on the local engine, same process.

    PYTHONPATH=. python bench/speculative.py --device cpu --threads 1 --out bench/results/speculative_cpu.json
    PYTHONPATH=. python bench/speculative.py --device cuda --out $OUT       # H200: every part, ~4-5 minutes

--out is a .json file or a directory (for speculative_<device>.json); the file is rewritten after every
part, so a run cut short keeps the parts it finished. The exit status is 1 when a float32 run's greedy
answers differ with speculation.

Parts (--parts, comma-separated; default all three, plus identity on CUDA):

  docqa-1      the reference model on doc-QA prompts (terse.synth test split, --worlds worlds; gold documents
               among distractors, ~2.5K tokens), one request at a time, greedy, up to 64 new tokens. Per
               mode: decode forward steps per token decoded (steps after the prefill step / tokens after
               the first) and decode wall time (latency - ttft, median of --repeats; modes interleaved per
               repeat), and whether the answers are token-identical (a float32 mismatch: exit status 1).
  identity     (CUDA) the docqa-1 questions in float32, plain and speculative, untimed: token-identical answers.
  docqa-batch  the same prompts (and the next worlds' when a batch needs more), --batches of them at once
               (prefilled into the prefix cache beforehand, so the timed runs are decode; one untimed full
               run first): completion tokens / wall s, median of --repeats, one engine alive at a time
               (plain, held, draft ahead, plain again; the faster plain counts).
  replay       random weights of --shape (8b on CUDA, tiny on CPU), 512-token random prompts, 128 new
               tokens. A replaying drafter proposes the model's own greedy continuation (from a plain run),
               each token right with probability a (--acceptance): decode tokens/s and ms per step vs
               plain, per batch. "forced" rows verify every draft (no adaptive back-off): at a = 0 that is
               the cost of a step whose drafts all fail; at a = 1 the verify step's cost vs a normal step.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from engine import model_config  # noqa: E402

from terse.backend.local.config import EngineConfig  # noqa: E402
from terse.backend.local.engine import LocalEngine  # noqa: E402
from terse.backend.local.prompt_lookup import DRAFTERS  # noqa: E402
from terse.backend.local.speculative import SpeculativeSettings  # noqa: E402
from terse.backend.types import Completion, SamplingParams  # noqa: E402
from terse.models import reference_model_path  # noqa: E402
from terse.organize.formats import qa_messages  # noqa: E402
from terse.synth.dataset import SplitConfig, build_split  # noqa: E402
from terse.synth.tokenizer import render_chat  # noqa: E402

MAX_NEW = 64


def docqa_prompts(num_worlds: int) -> list[tuple[str, str]]:
    """(kind, chat prompt) of the test split's questions with their full contexts (~2.5K tokens)."""
    data = build_split("test", SplitConfig(num_worlds=num_worlds, questions_per_kind=5, needle_lengths=(1024,),
                                           needle_depths=(0.5,)))
    out: list[tuple[str, str]] = []
    for q in data.questions:
        contexts = [(d, data.document(d).text) for d in q.context_doc_ids]
        out.append((q.kind, render_chat(list(qa_messages(q.question, contexts)))))  # type: ignore[arg-type]
    return out


def graph_rows(max_num_seqs: int, speculative: SpeculativeSettings | None) -> int:
    """CUDA graphs up to every row a step can have (the engine's default caps them at 256 rows; batch 64
    verifying k = 4 drafts has 320)."""
    return max(256, max_num_seqs * (1 + (speculative.num_draft_tokens if speculative is not None else 0)))


def reference_engine(
    args: argparse.Namespace, speculative: SpeculativeSettings | None, max_num_seqs: int, dtype: str | None = None
) -> LocalEngine:
    return LocalEngine.from_spec(
        str(reference_model_path()), device=args.device, dtype=dtype or args.dtype, max_num_seqs=max_num_seqs,
        num_kv_blocks=max_num_seqs * 200 + 256, max_model_len=4096, speculative=speculative,
        max_cuda_graph_batch_size=graph_rows(max_num_seqs, speculative),
    )


def settings(args: argparse.Namespace, **fields: Any) -> SpeculativeSettings:
    fields.setdefault("min_acceptance", args.min_acceptance)
    fields.setdefault("min_accepted_tokens", args.min_accepted_tokens)
    return SpeculativeSettings(num_draft_tokens=args.k, min_ngram=args.min_ngram, max_ngram=args.max_ngram, **fields)


def run_docqa_single(args: argparse.Namespace, prompts: list[tuple[str, str]]) -> dict[str, Any]:
    engines = {"plain": reference_engine(args, None, 4), "spec": reference_engine(args, settings(args), 4)}
    if args.device == "cpu":  # ablation: every decode row attended on its own (the CUDA-graph layout)
        engines["plain-rows"] = reference_engine(args, None, 4)
        engines["spec-rows"] = reference_engine(args, settings(args), 4)
        for mode in ("plain-rows", "spec-rows"):
            engines[mode].runner.attention.group_decode_rows = False
    else:  # the alternative design: drafts built on the step in flight's assumed outcome
        engines["spec-ahead"] = reference_engine(args, settings(args, draft_ahead=True), 4)
    params = SamplingParams(max_tokens=MAX_NEW)
    per: dict[str, dict[str, list[float]]] = {m: {"steps": [], "tokens": [], "wall": [], "draft": [], "accepted": []} for m in engines}
    kinds: dict[str, dict[str, list[float]]] = {}
    same = 0
    for eng in engines.values():
        eng.generate([prompts[0][1]], params)  # warm-up
    for kind, prompt in prompts:
        answers: dict[str, Any] = {}
        walls: dict[str, list[float]] = {mode: [] for mode in engines}
        steps: dict[str, int] = {}
        for _ in range(args.repeats):  # modes interleaved per repeat (noisy shared CPUs); the prefix cache
            for mode, eng in engines.items():  # makes later repeats' prefill short, decode is the same
                before = eng.stats["num_steps"]
                out = eng.generate([prompt], params)[0]
                steps[mode] = eng.stats["num_steps"] - before - 1  # the prompt fits one prefill step
                walls[mode].append(out.metrics["latency"] - out.metrics["ttft"])
                answers[mode] = out
        for mode, out in answers.items():
            row = per[mode]
            row["steps"].append(steps[mode])
            row["tokens"].append(len(out.token_ids) - 1)
            row["wall"].append(statistics.median(walls[mode]))
            row["draft"].append(out.usage.num_draft_tokens)
            row["accepted"].append(out.usage.num_accepted_tokens)
            k = kinds.setdefault(f"{kind}/{mode}", {"steps": [], "tokens": []})
            k["steps"].append(steps[mode])
            k["tokens"].append(len(out.token_ids) - 1)
        same += all(a.token_ids == answers["plain"].token_ids for a in answers.values())
    voided = {mode: eng.stats["num_voided_drafts"] for mode, eng in engines.items()}  # warm-up and repeats included
    for eng in engines.values():
        eng.close()
    summary: dict[str, Any] = {"questions": len(prompts), "token_identical": same}
    for mode, row in per.items():
        tokens = sum(row["tokens"])
        summary[mode] = {
            "decode_steps_per_token": sum(row["steps"]) / tokens, "decode_ms_per_token": 1000 * sum(row["wall"]) / tokens,
            "decode_tokens": tokens, "draft_tokens": sum(row["draft"]), "accepted_tokens": sum(row["accepted"]),
            "voided_drafts_all_runs": voided[mode],
        }
    p, s = summary["plain"], summary["spec"]
    summary["fewer_steps"] = p["decode_steps_per_token"] / s["decode_steps_per_token"]
    summary["decode_speedup"] = p["decode_ms_per_token"] / s["decode_ms_per_token"]
    if "spec-rows" in summary:
        summary["decode_speedup_rows"] = summary["plain-rows"]["decode_ms_per_token"] / summary["spec-rows"]["decode_ms_per_token"]
    if "spec-ahead" in summary:
        summary["decode_speedup_ahead"] = p["decode_ms_per_token"] / summary["spec-ahead"]["decode_ms_per_token"]
    summary["by_kind"] = {k: sum(v["steps"]) / max(sum(v["tokens"]), 1) for k, v in sorted(kinds.items())}
    return summary


def run_docqa_batch(args: argparse.Namespace, batch: int) -> dict[str, Any]:
    """Plain, speculative (held, the default) and draft-ahead engines, one engine alive at a time (a live
    idle engine's loop thread would share the host with the timed one), each warmed by an untimed full
    run; median of --repeats. Plain runs twice (first and last) and the faster counts, so a slow moment
    of the host does not flatter speculation. The questions of --worlds worlds, and of the next worlds
    when the batch needs more."""
    num_worlds = args.worlds
    prompts = docqa_prompts(num_worlds)
    while len(prompts) < batch:
        num_worlds += 1
        prompts = docqa_prompts(num_worlds)
    texts = [p for _, p in prompts[:batch]]
    params = SamplingParams(max_tokens=MAX_NEW)
    modes = {"plain": None, "spec": settings(args), "spec-ahead": settings(args, draft_ahead=True), "plain-again": None}
    row: dict[str, Any] = {"batch": batch, "worlds": num_worlds}
    outputs: dict[str, list[Completion]] = {}
    for mode, spec in modes.items():
        eng = reference_engine(args, spec, batch)
        eng.generate(texts, SamplingParams(max_tokens=1))  # prefill once: the timed runs hit the prefix cache
        eng.generate(texts, params)  # untimed: the kernels this batch's shapes need compile here
        walls, steps = [], []
        for _ in range(args.repeats):
            before = eng.stats["num_steps"]
            start = time.perf_counter()
            outs = eng.generate(texts, params)
            walls.append(time.perf_counter() - start)
            steps.append(eng.stats["num_steps"] - before)
        eng.close()
        tokens = sum(len(o.token_ids) for o in outs)
        outputs[mode] = outs
        row[mode] = {"tokens_per_s": tokens / statistics.median(walls), "walls": walls,
                     "steps": statistics.median(steps), "tokens": tokens,
                     "accepted_tokens": sum(o.usage.num_accepted_tokens for o in outs)}
    plain = max(row["plain"]["tokens_per_s"], row["plain-again"]["tokens_per_s"])
    row["token_identical"] = sum(a.token_ids == b.token_ids for a, b in zip(outputs["plain"], outputs["spec"]))
    row["throughput_change"] = row["spec"]["tokens_per_s"] / plain - 1
    row["throughput_change_ahead"] = row["spec-ahead"]["tokens_per_s"] / plain - 1
    return row


def run_identity(args: argparse.Namespace, prompts: list[tuple[str, str]]) -> dict[str, Any]:
    """Greedy answers in float32 with and without speculation, one request at a time (untimed)."""
    params = SamplingParams(max_tokens=MAX_NEW)
    answers = {}
    for mode, spec in (("plain", None), ("spec", settings(args))):
        eng = reference_engine(args, spec, 4, dtype="float32")
        answers[mode] = [eng.generate([p], params)[0] for _, p in prompts]
        eng.close()
    same = sum(a.token_ids == b.token_ids for a, b in zip(answers["plain"], answers["spec"]))
    return {"dtype": "float32", "questions": len(prompts), "token_identical": same,
            "accepted_tokens": sum(o.usage.num_accepted_tokens for o in answers["spec"])}


class ReplayDrafter:
    """Proposes the model's own greedy continuation of a known prompt (`TARGETS`), each token right with
    probability `ACCEPTANCE` (decided once per position, so every run replays the same drafts)."""

    TARGETS: dict[tuple[int, ...], list[int]] = {}
    ACCEPTANCE = 1.0

    def __init__(self, token_ids: list[int], min_ngram: int, max_ngram: int) -> None:
        self.prompt = tuple(token_ids)
        self.target = self.TARGETS.get(self.prompt, [])

    def update(self, token_ids: list[int], num_resolved: int) -> None:
        pass

    def propose(self, token_ids: list[int], num_resolved: int, tail: tuple[int, ...], max_tokens: int) -> list[int]:
        start = num_resolved + len(tail) - len(self.prompt)
        out = []
        for i in range(start, min(start + max_tokens, len(self.target))):
            right = random.Random(hash((self.prompt[:8], i))).random() < self.ACCEPTANCE
            out.append(self.target[i] if right else (self.target[i] + 1) % 1000)
        return out


def run_replay(args: argparse.Namespace, rows: list[dict[str, Any]], saved: Callable[[], None]) -> list[dict[str, Any]]:
    """Plain, adaptive and forced engines side by side; timed runs interleaved per repeat. Appends to
    `rows` and calls `saved` after each batch and acceptance (a run cut short keeps them)."""
    DRAFTERS["replay"] = ReplayDrafter  # type: ignore[assignment]
    shape = args.shape or ("8b" if args.device == "cuda" else "tiny")
    cfg = model_config(shape, max_len=1024)
    batches = [int(b) for b in args.replay_batches.split(",")]
    prompt_len, num_new = 512, 128
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 1000) for _ in range(prompt_len)] for _ in range(max(batches))]
    params = SamplingParams(max_tokens=num_new, ignore_eos=True)

    def make(spec: SpeculativeSettings | None) -> LocalEngine:
        blocks = max(batches) * -(-(prompt_len + num_new + 2 * args.k + 2) // 16) + 64
        config = EngineConfig(device=args.device, dtype=args.dtype, max_model_len=1024, max_num_seqs=max(batches),
                              num_kv_blocks=blocks, speculative=spec,
                              max_cuda_graph_batch_size=graph_rows(max(batches), spec))
        return LocalEngine.from_random(cfg, config, seed=0)

    def timed(eng: LocalEngine, batch: int) -> tuple[float, float, int, int, list[Completion]]:
        before = dict(eng.stats)
        start = time.perf_counter()
        outs = eng.generate(prompts[:batch], params)
        wall = time.perf_counter() - start
        after = eng.stats
        steps = after["num_steps"] - before["num_steps"]
        draft = after["num_draft_tokens"] - before["num_draft_tokens"]
        return wall, steps, draft, after["num_accepted_tokens"] - before["num_accepted_tokens"], outs

    engines = {"plain": make(None), "adaptive": make(settings(args, method="replay")),  # type: ignore[arg-type]
               "forced": make(settings(args, method="replay", min_acceptance=0.0, min_accepted_tokens=0.0))}  # type: ignore[arg-type]
    for batch in batches:
        for eng in engines.values():
            ReplayDrafter.ACCEPTANCE = 1.0
            outs = timed(eng, batch)[-1]  # warm-up (touches the KV pages, fills the prefix cache)
            if eng is engines["plain"]:
                for p, o in zip(prompts, outs):
                    ReplayDrafter.TARGETS[tuple(p)] = list(o.token_ids)
        for acceptance in args.acceptance:
            ReplayDrafter.ACCEPTANCE = acceptance
            runs: dict[str, list[tuple[float, float, int, int, list[Completion]]]] = {m: [] for m in engines}
            for _ in range(args.repeats):
                for mode, eng in engines.items():
                    runs[mode].append(timed(eng, batch))
            plain_wall = statistics.median(r[0] for r in runs["plain"])
            plain_step = statistics.median(r[0] / r[1] for r in runs["plain"])
            for mode in ("adaptive", "forced"):
                wall = statistics.median(r[0] for r in runs[mode])
                last = runs[mode][-1]
                row = {
                    "shape": shape, "batch": batch, "acceptance": acceptance, "adaptive": mode == "adaptive",
                    "tokens_per_s": batch * num_new / wall, "plain_tokens_per_s": batch * num_new / plain_wall,
                    "change": plain_wall / wall - 1, "steps": last[1], "plain_steps": runs["plain"][-1][1],
                    "ms_per_step": 1000 * statistics.median(r[0] / r[1] for r in runs[mode]),
                    "plain_ms_per_step": 1000 * plain_step,
                    "step_cost": statistics.median(r[0] / r[1] for r in runs[mode]) / plain_step,
                    "measured_acceptance": last[3] / max(last[2], 1),
                    "token_identical": sum(list(o.token_ids) == ReplayDrafter.TARGETS[tuple(p)] for p, o in zip(prompts, last[4])),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
            saved()
    for eng in engines.values():
        eng.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--parts", default=None, help="default: docqa-1,docqa-batch,replay (+ identity on CUDA)")
    ap.add_argument("--worlds", type=int, default=4)
    ap.add_argument("--limit", type=int, default=None, help="docqa-1 / identity: only the first N questions")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=SpeculativeSettings.num_draft_tokens)
    ap.add_argument("--min-ngram", type=int, default=SpeculativeSettings.min_ngram)
    ap.add_argument("--max-ngram", type=int, default=SpeculativeSettings.max_ngram)
    ap.add_argument("--min-acceptance", type=float, default=SpeculativeSettings.min_acceptance)
    ap.add_argument("--min-accepted-tokens", type=float, default=SpeculativeSettings.min_accepted_tokens,
                    help="held drafting: accepted draft tokens per verified step below which a sequence backs off")
    ap.add_argument("--shape", default=None, choices=["8b", "1b", "tiny"], help="replay: default 8b on CUDA, tiny on CPU")
    ap.add_argument("--replay-batches", default="1,16,64")
    ap.add_argument("--acceptance", default="0,0.5,0.8,1", help="replay: per-token draft accuracy")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch intra-op threads (1 keeps timings steady on cores other processes share)")
    ap.add_argument("--out", required=True, help="a .json file, or a directory for speculative_<device>.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.acceptance = [float(a) for a in args.acceptance.split(",")]
    default = "docqa-1,identity,docqa-batch,replay" if args.device == "cuda" else "docqa-1,docqa-batch,replay"
    parts = (args.parts or default).split(",")
    unknown = sorted(set(parts) - {"docqa-1", "identity", "docqa-batch", "replay"})
    if unknown:
        ap.error(f"--parts {unknown} unknown; choose from docqa-1, identity, docqa-batch, replay")
    out = Path(args.out)
    out = out if out.suffix == ".json" else out / f"speculative_{args.device}.json"
    results: dict[str, Any] = {
        "command": "PYTHONPATH=. python bench/speculative.py " + " ".join(sys.argv[1:]),
        "hardware": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "dtype": args.dtype, "threads": torch.get_num_threads(), "seconds": {},
    }
    prompts = docqa_prompts(args.worlds) if {"docqa-1", "identity"} & set(parts) else []
    runs = {
        "docqa-1": ("docqa_1", lambda: run_docqa_single(args, prompts[: args.limit])),
        "identity": ("identity", lambda: run_identity(args, prompts[: args.limit])),
        "docqa-batch": ("docqa_batch", lambda: [run_docqa_batch(args, int(b)) for b in args.batches.split(",")]),
        "replay": ("replay", lambda: run_replay(args, results.setdefault("replay", []), lambda: write_json(out, results))),
    }
    for part in parts:
        key, run = runs[part]
        start = time.perf_counter()
        results[key] = run()
        results["seconds"][part] = round(time.perf_counter() - start, 1)
        print(f"{part}: {results['seconds'][part]} s", json.dumps(results[key])[:2000], flush=True)
        write_json(out, results)  # after every part: a later part that fails or times out keeps these
    print_tables(results)
    print(f"\nwrote {out}")
    float32 = [results[k] for k in ("docqa_1", "identity") if k in results and (k == "identity" or args.dtype == "float32")]
    differ = [f"{r['questions'] - r['token_identical']} of {r['questions']}" for r in float32 if r["token_identical"] != r["questions"]]
    if differ:
        print(f"FAILED: greedy answers differ with speculation in float32 ({', '.join(differ)})")
    return 1 if differ else 0


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def print_tables(results: dict[str, Any]) -> None:
    if "docqa_1" in results:
        d = results["docqa_1"]
        print("\n| mode | decode steps / token | decode ms / token | accepted / draft |\n|---|---|---|---|")
        for mode in ("plain", "spec", "plain-rows", "spec-rows", "spec-ahead"):
            if mode not in d:
                continue
            m = d[mode]
            acc = f"{m['accepted_tokens']} / {m['draft_tokens']}" if m["draft_tokens"] else "-"
            print(f"| {mode} | {m['decode_steps_per_token']:.3f} | {m['decode_ms_per_token']:.2f} | {acc} |")
        print(f"\n{d['fewer_steps']:.2f}x fewer steps, {d['decode_speedup']:.2f}x faster decode; "
              f"{d['token_identical']}/{d['questions']} answers token-identical")
    if "identity" in results:
        i = results["identity"]
        print(f"float32: {i['token_identical']}/{i['questions']} answers token-identical with speculation")
    for row in results.get("docqa_batch", []):
        print(f"batch {row['batch']}: plain {row['plain']['tokens_per_s']:.1f} tok/s, spec {row['spec']['tokens_per_s']:.1f} "
              f"tok/s ({100 * row['throughput_change']:+.1f}%; draft ahead {100 * row['throughput_change_ahead']:+.1f}%), "
              f"{row['token_identical']}/{row['batch']} identical")
    if results.get("replay"):
        print("\n| shape | batch | a | adaptive | tok/s | plain tok/s | change | ms/step vs plain | measured a |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for r in results["replay"]:
            print(f"| {r['shape']} | {r['batch']} | {r['acceptance']} | {r['adaptive']} | {r['tokens_per_s']:.0f} | "
                  f"{r['plain_tokens_per_s']:.0f} | {100 * r['change']:+.1f}% | {r['step_cost']:.2f}x | "
                  f"{r['measured_acceptance']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
