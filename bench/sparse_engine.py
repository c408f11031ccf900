"""Sparse prefill inside the local engine: whole-model prefill time dense vs sparse, and end-to-end greedy
agreement with dense prefill on the reference model's long documents.

  speed      one prompt of `--prompt-len` tokens through the whole model (random weights of `--shape`),
             max_tokens=1: time to first token with EngineConfig.sparse_prefill off and on (default
             vertical-slash patterns, the kernels' default threshold unless --threshold).
  agreement  the bundled reference model continues `--num-docs` long synthetic documents greedily with
             dense prefill and with sparse prefill at a low threshold; reports how many generated tokens
             agree (whole continuation and longest common prefix).

    PYTHONPATH=. python3 bench/sparse_engine.py --device cpu --no-speed --doc-len 3072 --threshold 1024
    PYTHONPATH=. python3 bench/sparse_engine.py --device cuda --shape 8b --prompt-len 131072     # H200

Prints a table; writes JSON to $OUT/sparse_engine_<device>.json when $OUT is set, else bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from engine import SHAPES as ENGINE_SHAPES
from engine import model_config as engine_model_config

from terse.backend.local.config import EngineConfig, SparsePrefillSettings
from terse.backend.local.engine import LocalEngine
from terse.backend.local.models.llama import ModelConfig
from terse.backend.types import SamplingParams
from terse.kernels.prefill_config import SparsePrefillConfig

# The engine benchmark's shapes, with a head dim the Triton sparse kernels take (64) for the tiny one.
SHAPES: dict[str, dict[str, Any]] = {
    "8b": ENGINE_SHAPES["8b"],
    "tiny": dict(ENGINE_SHAPES["tiny"], head_dim=64, rope_theta=500000.0),
}


def model_config(shape: str, max_len: int) -> ModelConfig:
    return engine_model_config(shape, max_len, shapes=SHAPES)


def prefill_seconds(engine: LocalEngine, prompt: list[int], num_reps: int) -> list[float]:
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    times = []
    for _ in range(num_reps + 1):  # the first run warms up kernels and allocator
        start = time.perf_counter()
        engine.generate([prompt], params)
        times.append(time.perf_counter() - start)
    return times[1:]


def speed(args: argparse.Namespace) -> dict[str, Any]:
    max_len = args.prompt_len + 16
    threshold = args.threshold or SparsePrefillConfig().min_sparse_q_len
    prompt = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    results: dict[str, Any] = {"prompt_len": args.prompt_len, "threshold": threshold}
    for name, enabled in (("dense", False), ("sparse", True)):
        config = EngineConfig(
            device=args.device, max_model_len=max_len, max_num_seqs=1, max_num_batched_tokens=args.prompt_len,
            enable_prefix_cache=False, enable_cuda_graphs=False, num_kv_blocks=max_len // 16 + 1,
            sparse_prefill=SparsePrefillSettings(enabled=enabled, kernel=SparsePrefillConfig(min_sparse_q_len=threshold)),
        )
        engine = LocalEngine.from_random(model_config(args.shape, max_len), config)
        try:
            results[name] = prefill_seconds(engine, prompt, args.reps)
        finally:
            engine.close()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return results


def long_documents(engine: LocalEngine, num_docs: int, doc_len: int) -> list[list[int]]:
    from terse.synth.dataset import SplitConfig, build_split

    docs = build_split("validation", SplitConfig(num_worlds=2, questions_per_kind=0, needle_lengths=(64,))).documents
    text_ids: list[int] = []
    for doc in docs:
        text_ids += engine.encode(doc.title + "\n" + doc.text + "\n\n")
    stride = max(1, (len(text_ids) - doc_len) // max(num_docs, 1))
    return [text_ids[i * stride : i * stride + doc_len] for i in range(num_docs) if i * stride + doc_len <= len(text_ids)]


def agreement(args: argparse.Namespace) -> dict[str, Any]:
    from terse.models import reference_model_path

    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    outputs: dict[str, list[list[int]]] = {}
    for name, enabled in (("dense", False), ("sparse", True)):
        engine = LocalEngine.from_spec(
            str(reference_model_path()), device=args.device, max_model_len=args.doc_len + args.new_tokens + 16,
            max_num_batched_tokens=args.doc_len + 16, enable_prefix_cache=False,
            sparse_prefill=SparsePrefillSettings(
                enabled=enabled, kernel=SparsePrefillConfig(min_sparse_q_len=args.threshold or 1024)
            ),
        )
        try:
            prompts = long_documents(engine, args.num_docs, args.doc_len)
            outputs[name] = [list(c.token_ids) for c in engine.generate(prompts, params)]
            if enabled:
                assert engine.runner.attention.sparse_prefill is not None
                num_sparse = engine.runner.attention.sparse_prefill.num_sparse_spans
        finally:
            engine.close()
    rows = []
    for dense, sparse in zip(outputs["dense"], outputs["sparse"]):
        prefix = next((i for i, (a, b) in enumerate(zip(dense, sparse)) if a != b), len(dense))
        rows.append({"identical": dense == sparse, "common_prefix": prefix,
                     "token_agreement": sum(a == b for a, b in zip(dense, sparse)) / len(dense)})
    return {"doc_len": args.doc_len, "new_tokens": args.new_tokens, "threshold": args.threshold or 1024,
            "num_sparse_prefills": num_sparse, "docs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--threshold", type=int, default=0, help="min uncached tokens for sparse (0: default)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-agreement", action="store_true")
    parser.add_argument("--num-docs", type=int, default=8)
    parser.add_argument("--doc-len", type=int, default=3072)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    results: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
                               "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()}
    if not args.no_speed:
        s = results["speed"] = speed(args)
        dense, sparse = min(s["dense"]), min(s["sparse"])
        print(f"prefill {s['prompt_len']} tokens ({args.shape}): dense {dense:.3f} s, sparse {sparse:.3f} s, "
              f"speedup {dense / sparse:.2f}x (threshold {s['threshold']})")
    if not args.no_agreement:
        a = results["agreement"] = agreement(args)
        docs = a["docs"]
        print(f"\ngreedy agreement, reference model, {len(docs)} docs x {a['doc_len']} tokens, "
              f"{a['new_tokens']} new tokens, threshold {a['threshold']} ({a['num_sparse_prefills']} sparse prefills)")
        print(f"{'doc':>4} {'identical':>10} {'common prefix':>14} {'token agreement':>16}")
        for i, row in enumerate(docs):
            print(f"{i:>4} {row['identical']!s:>10} {row['common_prefix']:>14} {row['token_agreement']:>16.3f}")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sparse_engine_{args.device}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
