"""Streaming KV cache benchmark: decode speed and KV memory vs tokens generated, and long-text perplexity.

Speed (random weights of a model shape, `--shape`):
  streaming  B streams decode T tokens each under sinks + window: KV memory must go flat once the window
             fills, tokens/s must not fall with T.
  dense      the same streams on the dense cache, until the pool no longer holds them.
  recompute  sliding window with re-computation (StreamingLLM's baseline): every new token re-prefills
             the last `window` tokens from scratch (positions 0..window-1, prefix cache off).
Quality (`--quality`, the bundled reference model, trained on <= 4096-token examples): per-token
  perplexity over synthetic documents longer than that, dense vs streaming vs window without sinks,
  scored in chunks of `--chunk` tokens (each chunk sees sinks + window + itself).

    PYTHONPATH=. python3 bench/streaming.py --device cpu --shape tiny --quality            # CPU, minutes
    PYTHONPATH=. python3 bench/streaming.py --device cuda --shape 8b --streams 64 --tokens 16384 \
        --window 4096                                                         # stream-1M: 64 x 16K on an H200

Prints a table; writes JSON to $OUT/streaming_<shape>.json when $OUT is set, else bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from engine import SHAPES, model_config

from terse.backend.local.config import EngineConfig
from terse.backend.local.engine import LocalEngine
from terse.backend.local.kv_cache import KVCachePool
from terse.backend.local.requests import Request
from terse.backend.local.scheduler import StepPlan
from terse.backend.local.sequence import Sequence as Seq
from terse.backend.types import SamplingParams, StreamingKV

PROMPT_LEN = 32


def record_steps(engine: LocalEngine) -> list[tuple[float, int, int]]:
    """Wrap the runner: (time after the step, decode rows, blocks in use) per step. Waits for each step
    (the engine otherwise overlaps the next step's host work with it)."""
    records: list[tuple[float, int, int]] = []
    launch = engine.runner.launch

    def recording(plan: StepPlan) -> Any:
        handle = launch(plan)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        records.append((time.perf_counter(), len(plan.decodes), engine.stats["num_kv_blocks_used"]))
        return handle

    engine.runner.launch = recording  # type: ignore[method-assign]
    return records


def decode_curve(
    engine: LocalEngine, num_streams: int, num_tokens: int, streaming: StreamingKV | None, num_points: int = 16
) -> dict[str, Any]:
    """B streams of `num_tokens` tokens; tokens/s and KV MiB at `num_points` checkpoints."""
    records = record_steps(engine)
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (PROMPT_LEN,), generator=gen).tolist() for _ in range(num_streams)]
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True, streaming_kv=streaming)
    start = time.perf_counter()
    for handle in [engine.submit(p, params) for p in prompts]:
        handle.result()
    elapsed = time.perf_counter() - start
    mib = _bytes_per_block(engine) / 2**20
    decode_steps = [(t, used) for t, rows, used in records if rows == num_streams]
    points = []
    stride = max(1, len(decode_steps) // num_points)
    for i in range(stride, len(decode_steps), stride):
        (t0, _), (t1, used) = decode_steps[i - stride], decode_steps[i]
        points.append({"tokens": i + 1, "tokens_per_s": num_streams * stride / (t1 - t0), "kv_mib": used * mib})
    return {"num_streams": num_streams, "num_tokens": num_tokens, "seconds": elapsed, "points": points}


def recompute_rate(engine: LocalEngine, num_streams: int, window: int, num_reps: int) -> float:
    """Tokens/s of sliding window with re-computation: each token re-prefills `window` tokens."""
    gen = torch.Generator().manual_seed(1)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    engine.generate([[0]], params)  # warm-up
    start = time.perf_counter()
    for _ in range(num_reps):
        prompts = [torch.randint(0, vocab, (window,), generator=gen).tolist() for _ in range(num_streams)]
        for handle in [engine.submit(p, params) for p in prompts]:
            handle.result()
    return num_streams * num_reps / (time.perf_counter() - start)


def _bytes_per_block(engine: LocalEngine) -> int:
    c = engine.model_config
    return KVCachePool.bytes_per_block(
        num_layers=c.num_layers, block_size=engine.config.kv_block_size, num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim, dtype=engine.dtype,
    )


def speed(args: argparse.Namespace) -> dict[str, Any]:
    max_len = PROMPT_LEN + args.tokens + 16
    streaming = StreamingKV(sink_tokens=args.sinks, window_tokens=args.window)
    common: dict[str, Any] = {"device": args.device, "max_model_len": max_len, "kv_block_size": 16,
                              "max_num_seqs": max(args.streams, 1), "enable_prefix_cache": False}
    if args.kv_blocks:
        common["num_kv_blocks"] = args.kv_blocks
    results: dict[str, Any] = {}
    engine = LocalEngine.from_random(model_config(args.shape, max_len), EngineConfig(**common))
    try:
        results["streaming"] = decode_curve(engine, args.streams, args.tokens, streaming)
        capacity = engine.num_kv_blocks * 16 // args.streams - PROMPT_LEN - 16
        dense_tokens = min(args.tokens, capacity)
        results["dense"] = decode_curve(engine, args.streams, dense_tokens, None)
        results["dense"]["fits_tokens_per_stream"] = capacity
        results["kv_pool_mib"] = engine.num_kv_blocks * _bytes_per_block(engine) / 2**20
    finally:
        engine.close()
    # Recompute prefills `window` tokens per stream per token; cap a step at 64K tokens of activations.
    cfg = EngineConfig(**(common | {"max_num_batched_tokens": max(args.window, min(args.window * args.streams, 65536))}))
    engine = LocalEngine.from_random(model_config(args.shape, max_len), cfg)
    try:
        results["recompute_tokens_per_s"] = recompute_rate(engine, args.streams, args.window, args.recompute_reps)
    finally:
        engine.close()
    return results


def long_text_ids(engine: LocalEngine, num_tokens: int) -> list[int]:
    """Synthetic validation-split documents concatenated until `num_tokens` tokens."""
    from terse.synth.dataset import SplitConfig, build_split

    docs = build_split("validation", SplitConfig(num_worlds=2, questions_per_kind=0, needle_lengths=(64,))).documents
    ids: list[int] = []
    for doc in docs:
        ids += engine.encode(doc.title + "\n" + doc.text + "\n\n")
        if len(ids) >= num_tokens:
            break
    return ids[:num_tokens]


def streaming_logprobs(engine: LocalEngine, ids: list[int], streaming: StreamingKV | None) -> list[float]:
    """log P(ids[i + 1] | kept context) for every i. `score()` always uses the dense cache, so this queues
    a scoring sequence with the wanted policy through the engine's own request type."""
    params = SamplingParams(max_tokens=0, streaming_kv=streaming)
    seq = Seq(next(engine._ids), ids, params, engine.max_model_len, num_logprob_start=0)
    future: Future[list[float]] = Future()
    engine._send("add", (Request(seq, None, None), future))
    return future.result()


def quality(args: argparse.Namespace) -> dict[str, Any]:
    from terse.models import reference_model_path

    num_tokens = args.quality_tokens
    engine = LocalEngine.from_spec(
        f"{reference_model_path()}", device=args.device, max_model_len=num_tokens + 16, kv_block_size=16,
        max_num_batched_tokens=args.chunk, enable_prefix_cache=False,
    )
    try:
        ids = long_text_ids(engine, num_tokens)
        variants = {
            "dense": None,
            f"streaming {args.sinks}+{args.quality_window}": StreamingKV(args.sinks, args.quality_window),
            f"window {args.quality_window}, no sinks": StreamingKV(0, args.quality_window),
        }
        segment = args.segment
        table: dict[str, list[float]] = {}
        for name, streaming in variants.items():
            lp = torch.tensor(streaming_logprobs(engine, ids, streaming))
            table[name] = [float(torch.exp(-lp[s : s + segment].mean())) for s in range(0, len(lp), segment)]
    finally:
        engine.close()
    return {"num_tokens": len(ids), "segment_tokens": segment, "chunk": args.chunk, "perplexity": table}


def print_tables(results: dict[str, Any]) -> None:
    if "speed" in results:
        s = results["speed"]
        print(f"\nKV pool {s['kv_pool_mib']:.0f} MiB; dense fits {s['dense']['fits_tokens_per_stream']} tokens/stream")
        print(f"{'mode':<10} {'tokens':>8} {'tok/s':>10} {'KV MiB':>10}")
        for mode in ("streaming", "dense"):
            for p in s[mode]["points"]:
                print(f"{mode:<10} {p['tokens']:>8} {p['tokens_per_s']:>10.1f} {p['kv_mib']:>10.1f}")
        last = s["streaming"]["points"][-1]["tokens_per_s"]
        rate = s["recompute_tokens_per_s"]
        print(f"recompute  {'-':>8} {rate:>10.1f}   (streaming / recompute = {last / rate:.1f}x)")
    if "quality" in results:
        q = results["quality"]
        seg = q["segment_tokens"]
        print(f"\nperplexity per {seg}-token segment, reference model, {q['num_tokens']} tokens")
        for name, ppl in q["perplexity"].items():
            print(f"{name:<28} " + " ".join(f"{p:8.2f}" for p in ppl))


def plot(results: dict[str, Any], path: Path) -> None:
    """KV memory and tokens/s vs tokens generated (streaming, dense, recompute) and perplexity per segment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("speed", "quality") if k in results]
    fig, axes = plt.subplots(1, len(panels) + ("speed" in results), figsize=(5 * (len(panels) + 1), 3.6))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    if "speed" in results:
        s = results["speed"]
        for mode, style in (("streaming", "-o"), ("dense", "-s")):
            xs = [p["tokens"] for p in s[mode]["points"]]
            axes[0].plot(xs, [p["kv_mib"] for p in s[mode]["points"]], style, label=mode, ms=3)
            axes[1].plot(xs, [p["tokens_per_s"] for p in s[mode]["points"]], style, label=mode, ms=3)
        axes[0].axhline(s["kv_pool_mib"], color="gray", ls=":", label="KV pool")
        axes[1].axhline(s["recompute_tokens_per_s"], color="red", ls="--", label="window recompute")
        axes[0].set(xlabel="tokens generated per stream", ylabel="KV MiB in use", title="KV memory")
        axes[1].set(xlabel="tokens generated per stream", ylabel="decode tokens/s", title="decode speed")
        axes[0].legend(fontsize=8)
        axes[1].legend(fontsize=8)
    if "quality" in results:
        q = results["quality"]
        ax = axes[-1]
        for name, ppl in q["perplexity"].items():
            ax.plot([(i + 1) * q["segment_tokens"] for i in range(len(ppl))], ppl, "-o", label=name, ms=3)
        ax.axvline(4096, color="gray", ls=":", label="training length")
        ax.set(xlabel="token position (segment end)", ylabel="perplexity", title="reference model", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens generated per stream")
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--kv-blocks", type=int, default=0, help="pool size in blocks (0: kv_cache_memory)")
    parser.add_argument("--recompute-reps", type=int, default=8)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality-tokens", type=int, default=8192)
    parser.add_argument("--quality-window", type=int, default=1024)
    parser.add_argument("--segment", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--plot", type=Path, help="write a png of the curves here")
    parser.add_argument("--replot", type=Path, help="only plot an earlier JSON result (with --plot)")
    args = parser.parse_args()
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.plot)
        return
    results: dict[str, Any] = {
        "args": vars(args), "torch": torch.__version__, "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
    }
    if not args.no_speed:
        results["speed"] = speed(args)
    if args.quality:
        results["quality"] = quality(args)
    print_tables(results)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"streaming_{args.shape}_{args.device}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {path}")
    if args.plot is not None:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
