"""Prefix cache benchmark: shared-doc (questions over one long document) and few-shot (a long shared
prefix, many requests), radix prefix cache on vs off, same engine settings, same run.

    PYTHONPATH=. python bench/prefix_cache.py --shape tiny --doc-len 2048 --num-questions 32 \
        --fewshot-len 512 --num-fewshot 64 --out bench/results/prefix_cache_cpu.json      # CPU
    PYTHONPATH=. python bench/prefix_cache.py --shape 1b --out $OUT/prefix_cache_gpu.json  # H200

Random weights and random token ids; every request generates a fixed number of tokens (ignore_eos).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from bench.engine import model_config
from terse.backend.local.config import EngineConfig
from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams


def workload(prefix_len: int, num_requests: int, vocab: int, seed: int) -> list[list[int]]:
    """One shared prefix, then a distinct 16-48 token suffix per request."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, vocab, prefix_len).tolist()
    return [prefix + rng.integers(0, vocab, int(rng.integers(16, 49))).tolist() for _ in range(num_requests)]


def run(engine: LocalEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    stats0 = engine.stats
    t0 = time.perf_counter()
    outs = [h.result() for h in [engine.submit(p, params) for p in prompts]]
    elapsed = time.perf_counter() - t0
    ttfts = sorted(o.metrics["ttft"] for o in outs)
    stats = {k: v - stats0[k] for k, v in engine.stats.items()}
    return {
        "seconds": elapsed, "requests_per_s": len(prompts) / elapsed,
        "median_ttft_s": statistics.median(ttfts), "p90_ttft_s": ttfts[int(0.9 * (len(ttfts) - 1))],
        "cached_prompt_tokens": sum(o.usage.cached_prompt_tokens for o in outs),
        "prompt_tokens": sum(o.usage.prompt_tokens for o in outs),
        "prefill_tokens_computed": stats["num_prefill_tokens"], "outputs": [list(o.token_ids) for o in outs],
    }


def compare(shape: str, name: str, prefix_len: int, num_requests: int, max_tokens: int, block: int,
            memory: float) -> dict[str, Any]:
    cfg = model_config(shape)
    prompts = workload(prefix_len, num_requests, cfg.vocab_size, seed=1)
    warm = workload(64, 4, cfg.vocab_size, seed=2)
    result: dict[str, Any] = {"workload": name, "prefix_len": prefix_len, "num_requests": num_requests}
    for enabled in (False, True):
        engine = LocalEngine.from_random(cfg, EngineConfig(
            max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=prefix_len + 128, kv_block_size=block,
            kv_cache_memory=memory, enable_prefix_cache=enabled))
        run(engine, warm, 4)  # kernel compiles, CUDA graphs warm
        result["on" if enabled else "off"] = run(engine, prompts, max_tokens)
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    on, off = result["on"], result["off"]
    # The first request must compute the prefix; every later one can reuse its whole blocks.
    shareable = (num_requests - 1) * (prefix_len // block * block)
    result["identical_outputs"] = on.pop("outputs") == off.pop("outputs")
    result["cached_fraction_of_shareable"] = on["cached_prompt_tokens"] / shareable
    result["throughput_speedup"] = on["requests_per_s"] / off["requests_per_s"]
    result["median_ttft_speedup"] = off["median_ttft_s"] / on["median_ttft_s"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--doc-len", type=int, default=8192)
    ap.add_argument("--num-questions", type=int, default=64)
    ap.add_argument("--fewshot-len", type=int, default=2048)
    ap.add_argument("--num-fewshot", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-block-size", type=int, default=16)
    ap.add_argument("--kv-cache-memory", type=float, default=0.5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    results = [
        compare(args.shape, "shared-doc", args.doc_len, args.num_questions, args.max_tokens,
                args.kv_block_size, args.kv_cache_memory),
        compare(args.shape, "few-shot", args.fewshot_len, args.num_fewshot, args.max_tokens,
                args.kv_block_size, args.kv_cache_memory),
    ]
    print("\n| workload | prefix | requests | req/s off | req/s on | speedup | median TTFT off | on | cached/shareable | same outputs |")
    for r in results:
        print(f"| {r['workload']} | {r['prefix_len']} | {r['num_requests']} | {r['off']['requests_per_s']:.2f} | "
              f"{r['on']['requests_per_s']:.2f} | {r['throughput_speedup']:.1f}x | {r['off']['median_ttft_s']:.3f} s | "
              f"{r['on']['median_ttft_s']:.3f} s | {100 * r['cached_fraction_of_shareable']:.1f}% | {r['identical_outputs']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": args.shape, "torch": torch.__version__, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
