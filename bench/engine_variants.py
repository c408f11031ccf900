"""Engine variants on the 8B shape, one process: the decode sweep (batch 1 / 64 / 128, contexts ~384-520)
and mixed-256, plain, then after `gc.freeze()` (Python's cyclic collector no longer scans the objects
alive after start-up: does a collector pause show up in step times?), then with twice the paged-decode
splits (captured again).

    PYTHONPATH=. python3 bench/engine_variants.py --out-dir $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import bench_mixed_terse, decode_sweep, mixed_workload, model_config

import terse.kernels.paged_decode as paged_decode
from terse.backend.local.config import EngineConfig
from terse.backend.local.engine import LocalEngine


def run(engine: LocalEngine, args: argparse.Namespace, work: list[tuple[list[int], int]]) -> dict[str, Any]:
    gc_before = [s["collections"] for s in gc.get_stats()]
    t0 = time.perf_counter()
    sweep = decode_sweep(engine, args.batch_sizes, args.prompt_len, 8, args.num_new)
    mixed = bench_mixed_terse(engine, work)
    print("mixed", mixed["output_tok_per_s"], flush=True)
    return {"decode": sweep, "mixed": mixed, "seconds": time.perf_counter() - t0,
            "gc_collections": [s["collections"] - b for s, b in zip(gc.get_stats(), gc_before)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 128])
    ap.add_argument("--prompt-len", type=int, default=384)
    ap.add_argument("--num-new", type=int, default=136)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--kv-cache-memory", default="32GiB")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    config = EngineConfig.from_options({"max_num_seqs": 256, "max_num_batched_tokens": 8192, "max_model_len": 4096,
                                        "kv_cache_memory": args.kv_cache_memory, "enable_prefix_cache": False})
    engine = LocalEngine.from_random(model_config(args.shape), config)
    work = mixed_workload(args.num_requests, engine.model_config.vocab_size, 0, 300, 200, max_prompt=1024, max_output=512)
    bench_mixed_terse(engine, work[:16])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {"device": device, "args": vars(args)}
    result["plain"] = run(engine, args, work)
    gc.collect()
    gc.freeze()
    result["gc_frozen"] = run(engine, args, work)
    engine.close()
    chosen = paged_decode.choose_num_splits
    paged_decode.choose_num_splits = lambda *a: min(2 * chosen(*a), paged_decode.MAX_SPLITS)  # type: ignore[assignment]
    engine = LocalEngine.from_random(model_config(args.shape), config)
    bench_mixed_terse(engine, work[:16])
    result["double_splits_gc_frozen"] = run(engine, args, work)
    engine.close()
    (Path(args.out_dir) / "engine_variants_gpu.json").write_text(json.dumps(result, indent=2))
    print("\n| variant | " + " | ".join(f"bs{b} step ms" for b in args.batch_sizes) + " | mixed-256 tok/s | gc runs (gen0, gen1, gen2) |")
    print("|---|" + "---|" * (len(args.batch_sizes) + 2))
    for name in ("plain", "gc_frozen", "double_splits_gc_frozen"):
        r = result[name]
        steps = " | ".join(f"{row['step_ms']:.2f}" for row in r["decode"])
        print(f"| {name} | {steps} | {r['mixed']['output_tok_per_s']:.0f} | {tuple(r['gc_collections'])} |")


if __name__ == "__main__":
    main()
