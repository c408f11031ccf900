"""Answer accuracy vs compression ratio: terse.compress vs the `llmlingua` package, same scorer and reader.

    .venv/bin/python bench/compress_accuracy.py --baseline-python <venv with llmlingua 0.2.2>/bin/python \
        [--worlds 1] [--first-world 0] [--ratios 2,4,8] [--baselines longllmlingua,longllmlingua-coarse,llmlingua]
    .venv/bin/python bench/compress_accuracy.py --baselines "" --terse-configs terse,terse-free \
        --first-world 2 --worlds 4          # terse only (no llmlingua venv needed), 4 other test worlds

Workload: the synthetic doc-QA test split (single-hop, multi-hop and list questions; each question's
gold documents among distractors, ~2.4K tokens). For every question and ratio r, terse compresses the
documents to `Budget(rate=1/r)`; each llmlingua recipe gets the same documents, question and the same
target token count (`target_token` = terse's resolved target, both counted in the reference tokenizer).
The reference model is the scorer of both tools (llmlingua loads a copy of the same weights rewritten
for its older transformers) and the reader of every prompt: one QA prompt per question, the same
template as the full-context baseline, greedy, exact match.

llmlingua returns one string. The trailing question is removed, the rest is split on blank lines, and
each piece is labelled with the id of the source document it overlaps most (character 4-grams), so its
prompts carry the same document labels as terse's and the full context's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compress import BASELINES, REFERENCE, compatible_copy  # noqa: E402

from terse.answer_match import exact_match  # noqa: E402
from terse.organize.formats import qa_messages  # noqa: E402
from terse.synth import SplitConfig, build_split  # noqa: E402
from terse.synth.questions import Question  # noqa: E402

# LongLLMLingua's context-level filter alone (no token-level pruning): whole documents, no broken words
RECIPES: dict[str, dict[str, Any]] = {
    **BASELINES,
    "longllmlingua-coarse": {**BASELINES["longllmlingua"], "use_token_level_filter": False},
}
KINDS = ("single", "multi", "list")
# terse configurations (CompressorConfig fields); "terse" is the default compressor
TERSE_CONFIGS: dict[str, dict[str, Any]] = {
    "terse": {},
    "terse-parallel": {"token_pruner": "parallel"},
    "terse-iterative": {"token_pruner": "iterative"},
    # scorer-free, as the doc-QA job compresses by default: BM25 contexts and sentences, exact fit
    "terse-free": {"token_pruner": None, "sentence_ranker": "same"},
}


def grams(text: str, n: int = 4) -> set[str]:
    squeezed = " ".join(text.split())
    return {squeezed[i : i + n] for i in range(max(0, len(squeezed) - n + 1))}


def label_pieces(text: str, question: str, docs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """llmlingua's output as (source doc id, piece) contexts: question removed, split on blank lines."""
    body = text.strip()
    if body.endswith(question.strip()):
        body = body[: len(body) - len(question.strip())]
    doc_grams = [(doc_id, grams(doc)) for doc_id, doc in docs]
    out = []
    for piece in (p.strip() for p in body.split("\n\n")):
        if not piece:
            continue
        g = grams(piece)
        best = max(doc_grams, key=lambda d: len(g & d[1]))[0] if g else docs[0][0]
        out.append((best, piece))
    return out


def run_baselines(baseline_python: str, model_dir: Path, jobs: list[dict[str, Any]], recipes: dict[str, Any],
                  device: str, threads: int) -> dict[str, list[dict[str, Any]]]:
    with tempfile.TemporaryDirectory() as tmp:
        compat = compatible_copy(model_dir, Path(tmp) / "scorer-compat")
        job = {"model": str(compat), "examples": jobs, "baselines": recipes, "threads": threads, "device": device}
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        subprocess.run([baseline_python, str(ROOT / "bench" / "compress.py"), "--llmlingua-runner", str(job_path),
                        str(out_path)], check=True)
        return json.loads(out_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-python", default="", help="python of a venv with llmlingua 0.2.2 "
                        "(needed unless --baselines '')")
    parser.add_argument("--worlds", type=int, default=1, help="test-split worlds (28 questions each)")
    parser.add_argument("--first-world", type=int, default=0,
                        help="index of the first test world (worlds 0-1 are easier than typical ones)")
    parser.add_argument("--ratios", default="2,4,8")
    parser.add_argument("--baselines", default=",".join(RECIPES), help="llmlingua recipes ('' for none)")
    parser.add_argument("--terse-configs", default="terse", help=f"of {', '.join(TERSE_CONFIGS)}")
    parser.add_argument("--limit", type=int, default=0, help="first N questions only (a smoke run)")
    parser.add_argument("--backend", default=f"hf:{REFERENCE}", help="terse scorer and reader of every prompt")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both tools (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compress_accuracy.json")
    args = parser.parse_args()

    import torch

    import terse
    from terse.backend.types import SamplingParams
    from terse.compress import Budget, CompressorConfig, PromptCompressor

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ratios = [float(r) for r in args.ratios.split(",")]
    recipes = {name: RECIPES[name] for name in args.baselines.split(",") if name}
    if recipes and not args.baseline_python:
        parser.error("--baseline-python is needed for the llmlingua recipes (or pass --baselines '')")
    data = build_split("test", SplitConfig(num_worlds=args.worlds, needle_lengths=()), first_world=args.first_world)
    questions: list[Question] = [q for q in data.questions if q.kind in KINDS][: args.limit or None]
    backend = terse.load_backend(args.backend)
    compressors = {name: PromptCompressor(backend, config=CompressorConfig(**TERSE_CONFIGS[name]))
                   for name in args.terse_configs.split(",") if name}
    docs_of = {q.question: [(i, data.document(i).text) for i in q.context_doc_ids] for q in questions}

    # variant -> ratio -> per question: contexts, compressed text, seconds
    prompts: dict[str, dict[float, list[dict[str, Any]]]] = defaultdict(dict)
    prompts["full"][1.0] = [{"contexts": docs_of[q.question], "text": "", "seconds": 0.0} for q in questions]
    targets: dict[float, list[int]] = {}
    for name, compressor in compressors.items():
        warm = docs_of[questions[0].question]  # one untimed call, as the baseline runner makes
        compressor.compress([t for _, t in warm], question=questions[0].question, budget=Budget(rate=0.5))
        for ratio in ratios:
            rows, targets[ratio] = [], []
            for q in questions:
                docs = docs_of[q.question]
                t0 = time.perf_counter()
                result = compressor.compress([t for _, t in docs], question=q.question, budget=Budget(rate=1 / ratio))
                seconds = time.perf_counter() - t0
                # in the compressor's output order (ranked), as the doc-QA pipeline sends them
                contexts = [(docs[i][0], result.contexts[i]) for i in result.context_order if result.contexts[i]]
                rows.append({"contexts": contexts, "text": result.text, "seconds": seconds})
                targets[ratio].append(result.target_tokens)  # the same for every configuration
            prompts[name][ratio] = rows
            print(f"[accuracy] {name} {ratio:g}x compressed in {sum(r['seconds'] for r in rows):.1f} s", file=sys.stderr)

    if recipes:
        jobs = [{"docs": [t for _, t in docs_of[q.question]], "question": q.question, "target": targets[r][n],
                 "ratio": r, "n": n} for r in ratios for n, q in enumerate(questions)]
        t0 = time.perf_counter()
        theirs = run_baselines(args.baseline_python, REFERENCE, jobs, recipes, device, args.threads or 0)
        print(f"[accuracy] llmlingua runs: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for name, runs in theirs.items():
            for job, run in zip(jobs, runs):
                q = questions[job["n"]]
                contexts = label_pieces(run["text"], q.question, docs_of[q.question])
                prompts[name].setdefault(job["ratio"], []).append(
                    {"contexts": contexts, "text": run["text"], "seconds": run["seconds"]})

    results: list[dict[str, Any]] = []
    params = SamplingParams(max_tokens=64)
    for variant, by_ratio in prompts.items():
        for ratio, rows in by_ratio.items():
            rendered = [backend.render_chat(qa_messages(q.question, r["contexts"])) for q, r in zip(questions, rows)]
            completions = backend.generate(rendered, params)
            hits: dict[str, list[bool]] = defaultdict(list)
            for q, c in zip(questions, completions):
                hits[q.kind].append(exact_match(c.text, q.answer, q.items))
            n = len(questions)
            entry: dict[str, Any] = {
                "variant": variant, "ratio": ratio,
                "exact_match": sum(sum(v) for v in hits.values()) / n,
                "by_kind": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
                "num_questions": n,
                "reader_prompt_tokens": statistics.mean(c.usage.prompt_tokens for c in completions),
                "answer_kept": sum(all(i in " ".join(t for _, t in r["contexts"]) for i in (q.items or (q.answer,)))
                                   for q, r in zip(questions, rows)) / n,
                "compress_seconds_per_question": statistics.mean(r["seconds"] for r in rows),
                "answers": [c.text for c in completions],
            }
            if variant != "full":
                counts = [backend.count_tokens(r["text"]) for r in rows]
                entry["mean_compressed_tokens"] = statistics.mean(counts)
                entry["mean_target"] = statistics.mean(targets[ratio])
                entry["num_over_target"] = sum(c > t for c, t in zip(counts, targets[ratio]))
                entry["max_over_target"] = max(c - t for c, t in zip(counts, targets[ratio]))
            results.append(entry)
            print(f"[accuracy] {variant} {ratio:g}x: EM {entry['exact_match']:.3f} {entry['by_kind']}", file=sys.stderr)

    import transformers

    report = {
        "backend": args.backend, "num_worlds": args.worlds, "first_world": args.first_world,
        "num_questions": len(questions),
        "hardware": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()})",
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "recipes": recipes, "rows": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1).replace(str(ROOT) + "/", ""))  # repository-relative paths
    print(f"\n{'variant':<24}{'ratio':>6}{'EM':>7}{'single':>8}{'multi':>7}{'list':>6}{'kept':>6}"
          f"{'tokens/target':>15}{'over':>6}{'s/q':>7}")
    for r in results:
        k = r["by_kind"]
        budget = f"{r['mean_compressed_tokens']:.0f}/{r['mean_target']:.0f}" if "mean_target" in r else "—"
        print(f"{r['variant']:<24}{r['ratio']:>5g}x{r['exact_match']:>7.3f}{k.get('single', 0):>8.2f}"
              f"{k.get('multi', 0):>7.2f}{k.get('list', 0):>6.2f}{r['answer_kept']:>6.2f}{budget:>15}"
              f"{r.get('num_over_target', 0):>6}{r['compress_seconds_per_question']:>7.2f}")


if __name__ == "__main__":
    main()
