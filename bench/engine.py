"""Local engine benchmarks: correctness first, then decode step time vs batch size against transformers'
static-cache `generate` (compiled with CUDA graphs) and the memory-bandwidth bound, where a step's time
goes, and mixed-256 throughput; one process, the same weights for every contestant.

    PYTHONPATH=. python3 bench/engine.py --shape 8b --out-dir $OUT                       # H200
    PYTHONPATH=. python3 bench/engine.py --shape tiny --batch-sizes 1 4 --num-requests 16 \\
        --prompt-median 64 --output-median 16 --kv-cache-memory 1GiB --out-dir /tmp/engine   # CPU smoke run

Random weights (built on the device, nothing written to disk); prompts are random token ids. Results:
`engine_gpu.json` / `engine_cpu.json` and `engine_check.json` under --out-dir; a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from terse.backend.local.config import EngineConfig
from terse.backend.local.engine import LocalEngine
from terse.backend.local.models.llama import ModelConfig
from terse.backend.types import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_check import check_engine, check_kernels
from engine_profile import profile_decode

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B architecture
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               head_dim=128, vocab_size=128256, rope_theta=500000.0),
    # Llama-3.2-1B architecture
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
               head_dim=64, vocab_size=128256, rope_theta=500000.0),
    # small enough for CPU runs
    "tiny": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4,
                 head_dim=32, vocab_size=4096, rope_theta=10000.0),
}


def model_config(shape: str, max_len: int = 8192, shapes: dict[str, dict[str, Any]] = SHAPES) -> ModelConfig:
    """A Llama model config of one of `shapes` (the other GPU benchmarks share these shapes)."""
    s = shapes[shape]
    return ModelConfig(
        architecture="LlamaForCausalLM", rms_norm_eps=1e-5, rope_scaling=None, max_position_embeddings=max_len,
        attention_bias=False, qk_norm=False, mlp_bias=False, tie_word_embeddings=False, sliding_window=None,
        bos_token_id=None, eos_token_ids=(), **s,
    )


def hf_twin(engine: LocalEngine) -> torch.nn.Module:
    """A transformers LlamaForCausalLM sharing the engine model's weight tensors (no copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = engine.model_config
    cfg = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=engine.device)
    model.load_state_dict(engine.runner.model.checkpoint_state_dict(), assign=True)
    with torch.device(engine.device):  # buffers computed at construction (RoPE frequencies)
        model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    model.generation_config.eos_token_id = None
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 10."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times[2:])


def gpu_ms(fn: Any, device: torch.device, reps: int = 20) -> float:
    """Median milliseconds of `fn()` (CUDA events on the GPU, the host clock on CPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_batch(engine: LocalEngine, prompts: list[list[int]], num_new: int) -> tuple[float, dict[str, float]]:
    """Wall seconds to finish `prompts` with `num_new` tokens each, and the engine loop's host seconds."""
    before = dict(engine.host_seconds)
    sync(engine.device)
    t0 = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_tokens=num_new, ignore_eos=True)) for p in prompts]
    for h in handles:
        assert h.result().usage.completion_tokens == num_new
    elapsed = time.perf_counter() - t0
    return elapsed, {k: engine.host_seconds[k] - before[k] for k in before}


def decode_sweep(engine: LocalEngine, batch_sizes: list[int], prompt_len: int, n1: int, n2: int) -> list[dict[str, Any]]:
    """Per batch size: the engine's decode step, (t(n2) - t(n1)) / (n2 - n1) of whole batches (prefill
    cancels out; scheduling, sampling and the host loop included), plus the captured graph alone and the
    lm_head + argmax alone, timed with CUDA events."""
    rng = np.random.default_rng(1)
    vocab = engine.model_config.vocab_size
    rows = []
    for bs in batch_sizes:
        prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(bs)]
        run_batch(engine, prompts, 4)  # warm-up at this size
        t1, host1 = run_batch(engine, prompts, n1)
        t2, host2 = run_batch(engine, prompts, n2)
        steps = n2 - n1
        # host seconds of the loop thread per decode step (prefill cancels out as in step_ms); "wait" is
        # the time the host sat waiting for the device
        host = {k: (host2[k] - host1[k]) / steps * 1e3 for k in host1}
        row: dict[str, Any] = {"batch_size": bs, "context_tokens": prompt_len + n2, "step_ms": (t2 - t1) / steps * 1e3,
                               "host_ms_per_step": host}
        graphs = engine.runner.graphs
        if graphs is not None and graphs.padded_size(bs) is not None:
            graph = graphs.graphs[graphs.padded_size(bs)]  # static inputs: this size's last decode step
            row["graph_ms"] = gpu_ms(graph.replay, engine.device)
            row["graph_blas"] = graphs.blas[graphs.padded_size(bs)]
        hidden = torch.randn(bs, engine.model_config.hidden_size, device=engine.device, dtype=engine.dtype)
        head = engine.runner.model.logits
        row["lm_head_argmax_ms"] = gpu_ms(lambda h=hidden, f=head: f(h).argmax(-1), engine.device)
        print("terse decode", row, flush=True)
        rows.append(row)
    return rows


class StepTimer:
    """A transformers logits processor recording when each generation step reaches sampling."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)  # generate() waits for the device every step anyway (its stopping check)
        self.times.append(time.perf_counter())
        return scores


def hf_static_decode(model: torch.nn.Module, device: torch.device, batch_sizes: list[int], prompt_len: int,
                     num_new: int, time_limit_s: float) -> list[dict[str, Any]]:
    """transformers `generate(..., cache_implementation="static")` (the decode step compiled with CUDA
    graphs on the first call at a shape): median step interval of a timed call after a warm-up call."""
    from transformers import LogitsProcessorList

    rng = np.random.default_rng(1)
    rows, started = [], time.perf_counter()
    for bs in batch_sizes:
        if time.perf_counter() - started > time_limit_s:
            print(f"hf static: time limit reached before batch {bs}", flush=True)
            break
        ids = torch.tensor(rng.integers(0, model.config.vocab_size, (bs, prompt_len)), device=device)
        kwargs: dict[str, Any] = {"do_sample": False, "cache_implementation": "static", "pad_token_id": 0,
                                  "attention_mask": torch.ones_like(ids)}
        if device.type != "cuda":
            kwargs["disable_compile"] = True
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=num_new, **kwargs)  # warm-up: compiles at this shape
            warmup = time.perf_counter() - t0
            timer = StepTimer(device)
            model.generate(ids, max_new_tokens=num_new, logits_processor=LogitsProcessorList([timer]), **kwargs)
        steps = np.diff(timer.times)[2:]
        row = {"batch_size": bs, "step_ms": float(np.median(steps)) * 1e3, "warmup_s": warmup}
        print("hf static decode", row, flush=True)
        rows.append(row)
    return rows


def mixed_workload(num: int, vocab: int, seed: int, prompt_median: int, output_median: int,
                   max_prompt: int, max_output: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) pairs: lognormal lengths (sigma 0.6) around the medians, clipped."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(np.log(prompt_median), 0.6, num), 8, max_prompt).astype(int)
    output_lens = np.clip(rng.lognormal(np.log(output_median), 0.6, num), 4, max_output).astype(int)
    return [(rng.integers(0, vocab, int(p)).tolist(), int(o)) for p, o in zip(prompt_lens, output_lens)]


def bench_mixed_terse(engine: LocalEngine, work: list[tuple[list[int], int]]) -> dict[str, Any]:
    sync(engine.device)
    before = dict(engine.host_seconds)
    t0 = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in work]
    outs = [h.result() for h in handles]
    elapsed = time.perf_counter() - t0
    num_out = sum(o.usage.completion_tokens for o in outs)
    assert num_out == sum(n for _, n in work)
    return {"seconds": elapsed, "output_tokens": num_out, "output_tok_per_s": num_out / elapsed,
            "median_ttft_s": statistics.median(o.metrics["ttft"] for o in outs),
            "host_seconds": {k: engine.host_seconds[k] - before[k] for k in before}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    ap.add_argument("--prompt-len", type=int, default=384, help="decode sweep prompts (contexts ~prompt + 72)")
    ap.add_argument("--hf-batch-sizes", type=int, nargs="*", default=[1, 8, 32, 64, 128])
    ap.add_argument("--profile-batch-sizes", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--hf-time-limit", type=float, default=240.0)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--prompt-median", type=int, default=300)
    ap.add_argument("--output-median", type=int, default=200)
    ap.add_argument("--kv-cache-memory", default="32GiB")
    ap.add_argument("--mixed-budgets", type=int, nargs="*", default=[16384],
                    help="mixed-256 again on engines with these step token budgets (the sweep's engine: 8192)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    result: dict[str, Any] = {"shape": args.shape, "args": vars(args), "torch": torch.__version__,
                              "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"}
    if not args.no_check:
        check: dict[str, Any] = {}
        for name, fn in (("kernels", check_kernels), ("engine", check_engine)):
            try:
                check[name] = fn(device)
            except Exception:  # report and go on to the timings: one device call holds both
                check[name] = {"error": traceback.format_exc()}
                traceback.print_exc()
            print("check", name, json.dumps(check[name])[:2000], flush=True)
        with open(Path(args.out_dir) / "engine_check.json", "w") as f:
            json.dump(check, f, indent=2)
    config = EngineConfig.from_options({
        "max_num_seqs": 256, "max_num_batched_tokens": 8192, "max_model_len": 4096,
        "kv_cache_memory": args.kv_cache_memory, "enable_prefix_cache": False,
    })
    t0 = time.perf_counter()
    engine = LocalEngine.from_random(model_config(args.shape), config)
    result["build_s"] = time.perf_counter() - t0
    result["dtype"], result["num_kv_blocks"] = str(engine.dtype), engine.num_kv_blocks
    result["weight_bytes"] = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    result["copy_bandwidth_Bps"] = copy_bandwidth(device)
    result["ops"] = type(engine.runner.model.ops).__name__
    out_path = Path(args.out_dir) / ("engine_gpu.json" if on_gpu else "engine_cpu.json")

    def save() -> None:  # after every section: a run cut short keeps what it measured
        out_path.write_text(json.dumps(result, indent=2))

    result["terse_decode"] = decode_sweep(engine, args.batch_sizes, args.prompt_len, 8, 72)
    save()
    result["profile"] = []
    for bs in args.profile_batch_sizes:
        try:
            result["profile"].append(profile_decode(engine, bs, args.prompt_len, Path(args.out_dir)))
        except Exception:
            result["profile"].append({"batch_size": bs, "error": traceback.format_exc()})
            traceback.print_exc()
        print("profile", result["profile"][-1], flush=True)
    save()
    work = mixed_workload(args.num_requests, engine.model_config.vocab_size, 0, args.prompt_median,
                          args.output_median, max_prompt=1024, max_output=512)
    bench_mixed_terse(engine, work[:16])  # warm-up (kernel compiles)
    result["mixed_terse"] = bench_mixed_terse(engine, work)
    result["mixed_terse"]["engine_stats"] = engine.stats
    print("terse mixed", result["mixed_terse"], flush=True)
    save()
    if args.hf_batch_sizes:
        try:
            hf = hf_twin(engine)
            result["hf_static_decode"] = hf_static_decode(hf, device, args.hf_batch_sizes, args.prompt_len, 72,
                                                          args.hf_time_limit)
        except Exception:
            result["hf_static_decode_error"] = traceback.format_exc()
            traceback.print_exc()
    engine.close()
    save()
    for budget in args.mixed_budgets:
        options = {**config.__dict__, "max_num_batched_tokens": budget}
        other = LocalEngine.from_random(model_config(args.shape), EngineConfig(**options))
        bench_mixed_terse(other, work[:16])
        result[f"mixed_terse_budget_{budget}"] = bench_mixed_terse(other, work)
        print(f"terse mixed, budget {budget}", result[f"mixed_terse_budget_{budget}"], flush=True)
        other.close()
        save()
    print_table(result)


def print_table(result: dict[str, Any]) -> None:
    bw, weights = result["copy_bandwidth_Bps"], result["weight_bytes"]
    c = model_config(result["shape"])
    kv_per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
    hf = {r["batch_size"]: r["step_ms"] for r in result.get("hf_static_decode", [])}
    print(f"\nops: {result['ops']}; weights {weights / 1e9:.2f} GB; copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| batch | context | terse step ms | graph ms | lm_head+argmax ms | host launch / process ms | bound ms | % of bound | hf static ms | terse vs hf |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["terse_decode"]:
        bs = r["batch_size"]
        bound = (weights + bs * r["context_tokens"] * kv_per_token) / bw * 1e3
        host = r["host_ms_per_step"]
        hf_ms = hf.get(bs)
        hf_cells = ("", "") if hf_ms is None else (f"{hf_ms:.2f}", f"{hf_ms / r['step_ms']:.2f}x")
        print(f"| {bs} | {r['context_tokens']} | {r['step_ms']:.2f} | {r.get('graph_ms', float('nan')):.2f} | "
              f"{r['lm_head_argmax_ms']:.2f} | {host['launch']:.2f} / {host['process']:.2f} | {bound:.2f} | "
              f"{100 * bound / r['step_ms']:.0f}% | {hf_cells[0]} | {hf_cells[1]} |")
    m = result["mixed_terse"]
    print(f"\nmixed-{result['args']['num_requests']}: {m['output_tok_per_s']:.0f} output tok/s "
          f"({m['output_tokens']} tokens in {m['seconds']:.1f} s), median TTFT {m['median_ttft_s']:.2f} s")


if __name__ == "__main__":
    main()
