"""Compression speed: terse.compress vs the `llmlingua` package, same scorer model, inputs and target.

    .venv/bin/python bench/compress.py --baseline-python <venv with llmlingua 0.2.2>/bin/python

Both tools load the same model (a random Llama-shaped model with the reference tokenizer; the files
are rewritten for llmlingua's older transformers, same weights) and compress the same generated multi-document
question sets to the same target token count. Token counts are taken with the scorer's tokenizer for
both (llmlingua's tiktoken counter is replaced by it, which also keeps it offline). Figures: input
tokens compressed per second, median seconds per example, budget overshoot, answer retention.

`bench/compress.py --quality` (reference model only): answer retention and gold-document-first rate
at 2x / 4x / 8x on validation questions of the synthetic doc-QA benchmark, per ranker.

The file doubles as the baseline runner: the baseline interpreter executes it with
`--llmlingua-runner IN OUT`, so module-level imports stay standard-library only.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "terse" / "models" / "reference"

# (name, llmlingua compress_prompt kwargs): LongLLMLingua's question-aware recipe and plain LLMLingua
BASELINES: dict[str, dict[str, Any]] = {
    "longllmlingua": {
        "rank_method": "longllmlingua", "condition_in_question": "after_condition", "reorder_context": "sort",
        "dynamic_context_compression_ratio": 0.3, "condition_compare": True, "context_budget": "+100",
    },
    "llmlingua": {},
}
# (name, CompressorConfig kwargs)
TERSE: dict[str, dict[str, Any]] = {
    "terse bm25+iterative": {"token_pruner": "iterative"},
    "terse default (bm25+parallel)": {},
    "terse lm+iterative": {"ranker": "lm", "token_pruner": "iterative"},
    "terse lm+parallel": {"ranker": "lm", "token_pruner": "parallel"},
}

NAMES = ["Alice", "Boris", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Junko", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara"]
COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Wonka", "Cyberdyne", "Soylent"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Quito", "Perth", "Porto", "Dakar", "Hanoi", "Tunis"]
FILLER = [
    "The weather that year was mild and the harvest was better than anyone expected.",
    "Local newspapers wrote at length about the new bridge over the river and its cost.",
    "Many visitors came for the summer festival in the old town, filling every hotel.",
    "The museum opened a new wing dedicated to modern sculpture and industrial design.",
    "Trains between the two largest cities now run every hour, even on public holidays.",
    "A long report on public libraries was published in the spring by the city council.",
    "Engineers argued for months about the budget of the new water treatment plant.",
    "The school added evening classes in languages, accounting and basic programming.",
    "Several cafes on the main square changed owners during the first half of the year.",
    "A storm in late autumn damaged roofs in the northern districts but nobody was hurt.",
]


# -- baseline runner (runs inside the llmlingua venv; standard library + llmlingua only) -------------
def llmlingua_runner(in_path: str, out_path: str) -> None:
    job = json.loads(Path(in_path).read_text())
    import tiktoken
    import torch
    from transformers import AutoTokenizer

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    tokenizer = AutoTokenizer.from_pretrained(job["model"])

    class SameTokenizerCounter:
        """Stands in for tiktoken's encoding: the scorer's tokenizer, so both tools count alike, offline."""

        def encode(self, text: str, **_: Any) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=False))

        def decode(self, ids: list[int], **_: Any) -> str:
            return str(tokenizer.decode(ids))

    tiktoken.encoding_for_model = lambda name: SameTokenizerCounter()
    tiktoken.get_encoding = lambda name: SameTokenizerCounter()
    from llmlingua import PromptCompressor

    compressor = PromptCompressor(job["model"], device_map=job.get("device", "cpu"))
    results: dict[str, list[dict[str, Any]]] = {}
    runs = [(name, kwargs, False) for name, kwargs in job["baselines"].items()]
    if job.get("device") == "cuda":
        # the same fix terse applies (see terse/backend/attention_kernels.py), so the faster of the two counts
        runs += [(name + " (cuDNN attention off)", kwargs, True) for name, kwargs in job["baselines"].items()]
    for name, kwargs, cudnn_off in runs:
        torch.backends.cuda.enable_cudnn_sdp(not cudnn_off)
        first = job["examples"][0]
        compressor.compress_prompt(first["docs"], question=first["question"], target_token=first["target"], **kwargs)
        results[name] = []
        for ex in job["examples"]:
            t0 = time.perf_counter()
            out = compressor.compress_prompt(ex["docs"], question=ex["question"], target_token=ex["target"], **kwargs)
            results[name].append({"seconds": time.perf_counter() - t0, "text": out["compressed_prompt"]})
            if len(results[name]) % 20 == 0:
                print(f"[llmlingua] {name}: {len(results[name])}/{len(job['examples'])}", file=sys.stderr, flush=True)
    Path(out_path).write_text(json.dumps(results))


# -- inputs -----------------------------------------------------------------------------------------
def make_example(rng: random.Random, num_docs: int, num_filler: int) -> dict[str, Any]:
    people = rng.sample(NAMES, num_docs)
    docs, answers = [], []
    for name in people:
        company = rng.choice(COMPANIES)
        answers.append(company)
        sentences = [
            f"{name} lives in {rng.choice(CITIES)} and has worked at {company} since {rng.randint(1990, 2024)}.",
            f"On weekends {name} likes to go {rng.choice(['sailing', 'climbing', 'cycling', 'fishing'])}.",
            *rng.sample(FILLER, num_filler),
        ]
        rng.shuffle(sentences)
        docs.append(" ".join(sentences))
    gold = rng.randrange(num_docs)
    return {"docs": docs, "question": f"Where does {people[gold]} work?", "answer": answers[gold], "gold": gold}


# -- scorer model -----------------------------------------------------------------------------------
def build_model(directory: Path, hidden: int, layers: int) -> Path:
    """A random Llama-shaped model with the reference tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(REFERENCE / "tokenizer.json"), bos_token="<|begin|>", eos_token="<|end|>",
        pad_token="<|pad|>",
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def compatible_copy(src: Path, dst: Path, dtype: str = "float32") -> Path:
    """The same weights and tokenizer in a form transformers 4.44 / tokenizers 0.19 read: top-level
    rope_theta, a pre-v5 tokenizer class name, and merges written as "a b" strings."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    cfg["torch_dtype"] = dtype  # what llmlingua loads on CUDA ("auto"); on CPU it always takes float32
    (dst / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((dst / "tokenizer_config.json").read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tcfg))
    tok = json.loads((dst / "tokenizer.json").read_text())
    tok["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    if cfg.get("tie_word_embeddings"):
        # 4.44 + accelerate leave a tied lm_head on the meta device: store it explicitly (same values)
        from safetensors.torch import load_file, save_file

        weights = load_file(str(dst / "model.safetensors"))
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
        cfg["tie_word_embeddings"] = False
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# -- terse side -------------------------------------------------------------------------------------
def run_terse(model_dir: Path, examples: list[dict[str, Any]], threads: int, device: str, dtype: str,
              schemes: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every TERSE configuration on every scorer scheme: `hf` (transformers, no prefix cache) and
    `local` (terse's engine: the iterative stage's growing prefixes come from its radix cache)."""
    import torch

    import terse

    if threads:
        torch.set_num_threads(threads)
    results: dict[str, list[dict[str, Any]]] = {}
    for scheme in schemes:
        options: dict[str, Any] = {"device": device, "dtype": dtype}
        if scheme == "local" and device == "cpu":
            options["num_kv_blocks"] = 4096  # a fixed pool (64K tokens) rather than a share of host memory
        scorer = terse.load_backend(f"{scheme}:{model_dir}", **options)
        results.update(_run_terse_configs(scorer, examples, f" [{scheme}]" if len(schemes) > 1 else ""))
        scorer.close()
    return results


def _run_terse_configs(scorer: Any, examples: list[dict[str, Any]], suffix: str) -> dict[str, list[dict[str, Any]]]:
    from terse.compress import Budget, CompressorConfig, PromptCompressor

    results: dict[str, list[dict[str, Any]]] = {}
    for name, kwargs in TERSE.items():
        name += suffix
        compressor = PromptCompressor(scorer, config=CompressorConfig(**kwargs))
        first = examples[0]
        compressor.compress(first["docs"], question=first["question"], budget=Budget(target_tokens=first["target"]))
        results[name] = []
        for ex in examples:
            t0 = time.perf_counter()
            out = compressor.compress(ex["docs"], question=ex["question"], budget=Budget(target_tokens=ex["target"]))
            results[name].append({"seconds": time.perf_counter() - t0, "text": out.text, "timings": out.timings})
    return results


def summarize(name: str, runs: list[dict[str, Any]], examples: list[dict[str, Any]], count: Any) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    compressed = [count(r["text"]) for r in runs]
    return {
        "method": name,
        "input_tokens_per_s": sum(ex["num_original"] for ex in examples) / sum(seconds),
        "median_s": statistics.median(seconds),
        "mean_compressed_tokens": statistics.mean(compressed),
        "mean_target": statistics.mean(ex["target"] for ex in examples),
        "num_over_budget": sum(c > ex["target"] for c, ex in zip(compressed, examples)),
        "max_over_budget": max(c - ex["target"] for c, ex in zip(compressed, examples)),
        "answer_kept": sum(ex["answer"] in r["text"] for r, ex in zip(runs, examples)) / len(examples),
    }


# -- quality proxy on the synthetic doc-QA benchmark ----------------------------------------------------
QUALITY_CONFIGS: dict[str, dict[str, Any]] = {
    "bm25 + iterative": {},
    "embedding + iterative": {"ranker": "embedding", "sentence_ranker": "embedding"},
    "lm + iterative": {"ranker": "lm", "sentence_ranker": "lm"},
    "no ranking, iterative only": {"ranker": None, "sentence_ranker": None},
}


def run_quality(model_dir: Path, num_questions: int, ratios: list[float], threads: int) -> dict[str, Any]:
    """Answer retention (all answer items still in the compressed prompt) and gold-document-first rate
    at each ratio, on validation-split single- and multi-hop questions (gold among distractors)."""
    import torch

    import terse
    from terse.compress import Budget, CompressorConfig, PromptCompressor
    from terse.synth.dataset import SplitConfig, build_split

    torch.set_num_threads(threads)
    data = build_split("validation", SplitConfig(num_worlds=1, questions_per_kind=num_questions, needle_lengths=()))
    questions = [q for q in data.questions if q.kind in ("single", "multi") and q.context_doc_ids]
    scorer = terse.load_backend(f"hf:{model_dir}", device="cpu", dtype="float32")
    rows = []
    for name, kwargs in QUALITY_CONFIGS.items():
        compressor = PromptCompressor(scorer, config=CompressorConfig(**kwargs))
        for ratio in ratios:
            kept = first = 0
            for q in questions:
                docs = [data.document(d).text for d in q.context_doc_ids]
                num = scorer.count_tokens("\n\n".join([*docs, q.question]))
                out = compressor.compress(docs, question=q.question, budget=Budget(target_tokens=int(num / ratio)))
                items = q.items or (q.answer,)
                kept += all(item in out.text for item in items)
                gold = {i for i, d in enumerate(q.context_doc_ids) if d in q.doc_ids}
                first += bool(out.context_order) and out.context_order[0] in gold
            rows.append({"config": name, "ratio": ratio, "answer_kept": kept / len(questions),
                         "gold_first": first / len(questions), "num_questions": len(questions)})
            print(f"{name:<28}{ratio:>4g}x  answer kept {kept / len(questions):.2f}  "
                  f"gold first {first / len(questions):.2f}", file=sys.stderr)
    scorer.close()
    return {"model": str(model_dir.name), "rows": rows}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--llmlingua-runner":
        llmlingua_runner(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) >= 2 and sys.argv[1] == "--quality":
        if not (REFERENCE / "config.json").exists():
            raise SystemExit("the quality proxy needs the reference model (terse/models/reference/)")
        report = run_quality(REFERENCE, num_questions=6, ratios=[2.0, 4.0, 8.0], threads=1)
        out = ROOT / "bench" / "results" / "compress_quality.json"
        out.write_text(json.dumps(report, indent=2))
        print(f"{'config':<28}{'ratio':>6}{'answer kept':>13}{'gold first':>12}")
        for r in report["rows"]:
            print(f"{r['config']:<28}{r['ratio']:>5g}x{r['answer_kept']:>13.2f}{r['gold_first']:>12.2f}")
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-python", required=True, help="python of a venv with llmlingua 0.2.2")
    parser.add_argument("--examples", type=int, default=6)
    parser.add_argument("--docs", type=int, default=10, help="documents per example")
    parser.add_argument("--filler", type=int, default=6, help="filler sentences per document")
    parser.add_argument("--ratio", type=float, default=4.0, help="compression ratio of the target (4 = 4x)")
    parser.add_argument("--scorer", choices=["random", "reference"], default="random",
                        help="random: a Llama-shaped model built here (--hidden, --layers); reference: the "
                             "shipped reference model")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both tools (0: default)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="scorer weights for both tools (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--terse-backends", default="hf", help="scorer schemes for terse, e.g. hf,local")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compress_speed.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if device == "cpu" and dtype != "float32":
        raise SystemExit("--dtype bfloat16 needs --device cuda: llmlingua always scores in float32 on CPU")
    with tempfile.TemporaryDirectory() as tmp:
        if args.scorer == "reference":
            model_dir, model_desc = REFERENCE, "reference model"
        else:
            model_dir = build_model(Path(tmp) / "scorer", args.hidden, args.layers)
            model_desc = f"random Llama-shaped, hidden {args.hidden}, {args.layers} layers, reference tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        rng = random.Random(0)
        examples = [make_example(rng, args.docs, args.filler) for _ in range(args.examples)]
        for ex in examples:
            ex["num_original"] = count("\n\n".join([*ex["docs"], ex["question"]]))
            ex["target"] = int(ex["num_original"] / args.ratio)
        baseline_dir = compatible_copy(model_dir, Path(tmp) / "scorer-compat", dtype)
        job = {"model": str(baseline_dir), "examples": examples, "baselines": BASELINES, "threads": args.threads,
               "device": device}
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "baseline.json"
        job_path.write_text(json.dumps(job))
        t0 = time.perf_counter()
        ours = run_terse(model_dir, examples, args.threads, device, dtype, args.terse_backends.split(","))
        print(f"terse runs: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        subprocess.run([args.baseline_python, __file__, "--llmlingua-runner", str(job_path), str(out_path)], check=True)
        print(f"llmlingua runs: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        theirs = json.loads(out_path.read_text())
    rows = [summarize(n, r, examples, count) for n, r in {**ours, **theirs}.items()]
    report = {
        "model": model_desc, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": dtype,
        "versions": f"torch {torch.__version__}", "threads": args.threads, "num_examples": len(examples), "docs": args.docs,
        "mean_original_tokens": statistics.mean(ex["num_original"] for ex in examples), "ratio": args.ratio,
        "rows": rows,
        "terse_stage_seconds": {n: [r["timings"] for r in runs] for n, runs in ours.items()},
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    best_baseline = max(r["input_tokens_per_s"] for r in rows if not r["method"].startswith("terse"))
    print(f"\n{model_desc}; {len(examples)} examples x {args.docs} docs, "
          f"~{report['mean_original_tokens']:.0f} tokens each, target = original / {args.ratio:g}")
    print(f"{'method':<44}{'tok/s':>9}{'vs best llmlingua':>19}{'median s':>10}{'tokens/target':>16}"
          f"{'over':>6}{'answer kept':>13}")
    for r in rows:
        print(f"{r['method']:<44}{r['input_tokens_per_s']:>9.0f}{r['input_tokens_per_s'] / best_baseline:>18.2f}x"
              f"{r['median_s']:>10.2f}{r['mean_compressed_tokens']:>8.0f}/{r['mean_target']:<7.0f}"
              f"{r['num_over_budget']:>6}{r['answer_kept']:>13.2f}")


if __name__ == "__main__":
    main()
