"""Plot decode step time vs batch size (terse vs transformers static cache vs the bandwidth bound) from
bench/engine.py results.

    python3 bench/plot_engine.py bench/results/engine_gpu_run1.json bench/results/engine_gpu.json \\
        bench/results/engine_gpu_blas.json --labels "run 1" "run 2" "run 4, BLAS per graph" \\
        --out docs/engine_decode_vs_batch.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="engine_gpu.json files (one line set per run)")
    ap.add_argument("--out", default="docs/engine_decode_vs_batch.png")
    ap.add_argument("--labels", nargs="*", help="one label per results file (default: run 1, run 2, ...)")
    args = ap.parse_args()
    n = len(args.results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, path in enumerate(args.results):
        with open(path) as f:
            r = json.load(f)
        label = args.labels[i] if args.labels else f"run {i + 1}"
        alpha = 1.0 if i == n - 1 else 0.25 + 0.35 * i / max(n - 1, 1)  # the latest run in full
        rows = r["terse_decode"]
        bs = [row["batch_size"] for row in rows]
        ax.plot(bs, [row["step_ms"] for row in rows], "o-", color="C0", alpha=alpha, label=f"terse engine step ({label})")
        ax.plot(bs, [row["graph_ms"] for row in rows], ".:", color="C0", alpha=alpha, label=f"terse captured graph only ({label})")
        hf = r.get("hf_static_decode", [])
        ax.plot([h["batch_size"] for h in hf], [h["step_ms"] for h in hf], "s-", color="C3", alpha=alpha,
                label=f"transformers static cache ({label})")
        if i == n - 1:
            kv = 32 * 2 * 8 * 128 * 2  # bytes of KV per token, 8B shape, bf16
            bound = [(r["weight_bytes"] + b * row["context_tokens"] * kv) / r["copy_bandwidth_Bps"] * 1e3 for b, row in zip(bs, rows)]
            ax.plot(bs, bound, "--", color="gray", label="bound: weights + KV / copy bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch size (contexts ~392-456 tokens)")
    ax.set_ylabel("ms per decode step")
    ax.set_title("8B shape, bf16, one H200: decode step vs batch size")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)


if __name__ == "__main__":
    main()
