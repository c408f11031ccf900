"""The BLAS library inside the captured decode graphs, on the 8B shape: engines whose graphs were captured
with cuBLAS only, with cuBLASLt only, and with the per-size choice (`cuda_graph_blas="auto"`: each size
captured with both, the faster replay kept), side by side in one process on the same random weights.
Rounds alternate between the engines; each round runs the decode sweep (bench/engine.py's method) and
mixed-256.

    PYTHONPATH=. python3 bench/engine_blas.py --out-dir $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import bench_mixed_terse, decode_sweep, mixed_workload, model_config

from terse.backend.local.config import EngineConfig
from terse.backend.local.engine import LocalEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--prompt-len", type=int, default=384)
    ap.add_argument("--num-new", type=int, default=72)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--variants", nargs="+", default=["cublas", "auto"], choices=["auto", "cublas", "cublaslt"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--no-mixed", action="store_true")
    ap.add_argument("--kv-cache-memory", default="24GiB")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "torch": torch.__version__, "args": vars(args), "engines": {}, "rounds": []}
    out = Path(args.out_dir) / "engine_blas_gpu.json"
    engines: dict[str, LocalEngine] = {}
    for name in args.variants:
        config = EngineConfig.from_options({
            "max_num_seqs": 256, "max_num_batched_tokens": 8192, "max_model_len": 4096,
            "kv_cache_memory": args.kv_cache_memory, "enable_prefix_cache": False, "cuda_graph_blas": name})
        t0 = time.perf_counter()
        engines[name] = LocalEngine.from_random(model_config(args.shape), config)
        graphs = engines[name].runner.graphs
        result["engines"][name] = {"build_s": time.perf_counter() - t0,
                                   "graph_blas": dict(graphs.blas) if graphs is not None else None}
        print(name, result["engines"][name], flush=True)
    vocab = next(iter(engines.values())).model_config.vocab_size
    work = mixed_workload(args.num_requests, vocab, 0, 300, 200, max_prompt=1024, max_output=512)
    for engine in engines.values():
        bench_mixed_terse(engine, work[:16])  # warm-up
    for r in range(args.rounds):
        for name, engine in engines.items():
            row: dict[str, Any] = {"round": r, "variant": name,
                                   "decode": decode_sweep(engine, args.batch_sizes, args.prompt_len, 8, args.num_new)}
            if not args.no_mixed:
                row["mixed"] = bench_mixed_terse(engine, work)
                print(name, "mixed", round(row["mixed"]["output_tok_per_s"]), flush=True)
            result["rounds"].append(row)
            out.write_text(json.dumps(result, indent=2))
    for engine in engines.values():
        engine.close()
    print("\n| round | variant | " + " | ".join(f"bs{b} step (graph) ms" for b in args.batch_sizes) + " | mixed tok/s |")
    print("|---|---|" + "---|" * (len(args.batch_sizes) + 1))
    for row in result["rounds"]:
        cells = " | ".join(f"{d['step_ms']:.2f} ({d.get('graph_ms', float('nan')):.2f}, {d.get('graph_blas', '-')})"
                           for d in row["decode"])
        mixed = f"{row['mixed']['output_tok_per_s']:.0f}" if "mixed" in row else "-"
        print(f"| {row['round']} | {row['variant']} | {cells} | {mixed} |")


if __name__ == "__main__":
    main()
