"""Local engine benchmarks: batch-1 decode vs the memory-bandwidth bound, and mixed-256 throughput vs
transformers `generate` with static batches of the same model (same weights, same run).

    PYTHONPATH=. python bench/engine.py --shape tiny --out bench/results/engine_cpu.json      # CPU
    PYTHONPATH=. python bench/engine.py --shape 8b --out $OUT/engine_gpu.json                # H200

Random weights (built on the device, nothing written to disk); prompts are random token ids.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import traceback
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from terse.backend.local.config import EngineConfig
from terse.backend.local.engine import LocalEngine
from terse.backend.local.models.llama import ModelConfig
from terse.backend.types import SamplingParams

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


def bench_decode(engine: LocalEngine, num_new: int, prompt_len: int = 128) -> dict[str, float]:
    """Batch-1 decode: seconds per output token after the first, median of 3 runs."""
    rng = np.random.default_rng(0)
    per_token = []
    for _ in range(3):
        prompt = rng.integers(0, engine.model_config.vocab_size, prompt_len).tolist()
        out = engine.submit(prompt, SamplingParams(max_tokens=num_new, ignore_eos=True)).result()
        per_token.append((out.metrics["latency"] - out.metrics["ttft"]) / (num_new - 1))
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    bandwidth = copy_bandwidth(engine.device)
    bound = weight_bytes / bandwidth
    step = statistics.median(per_token)
    return {"decode_s_per_token": step, "weight_bytes": weight_bytes, "copy_bandwidth_Bps": bandwidth,
            "bandwidth_bound_s_per_token": bound, "fraction_of_bound": bound / step}


def mixed_workload(num: int, vocab: int, seed: int, prompt_median: int, output_median: int,
                   max_prompt: int, max_output: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) pairs: lognormal lengths (sigma 0.6) around the medians, clipped."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(np.log(prompt_median), 0.6, num), 8, max_prompt).astype(int)
    output_lens = np.clip(rng.lognormal(np.log(output_median), 0.6, num), 4, max_output).astype(int)
    return [(rng.integers(0, vocab, int(p)).tolist(), int(o)) for p, o in zip(prompt_lens, output_lens)]


def bench_mixed_terse(engine: LocalEngine, work: list[tuple[list[int], int]]) -> dict[str, float]:
    sync(engine.device)
    t0 = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in work]
    outs = [h.result() for h in handles]
    elapsed = time.perf_counter() - t0
    num_out = sum(o.usage.completion_tokens for o in outs)
    assert num_out == sum(n for _, n in work)
    return {"seconds": elapsed, "output_tokens": num_out, "output_tok_per_s": num_out / elapsed,
            "median_ttft_s": statistics.median(o.metrics["ttft"] for o in outs)}


@torch.inference_mode()
def bench_mixed_hf(model: torch.nn.Module, work: list[tuple[list[int], int]], batch_size: int,
                   device: torch.device, time_limit_s: float) -> dict[str, float]:
    """Static batches in submission order: left-padded prompts, every row runs to the batch's longest
    output. Counts only each request's own output tokens. Stops after `time_limit_s` (whole batches)."""
    useful, elapsed, num_requests = 0, 0.0, 0
    for start in range(0, len(work), batch_size):
        batch = work[start : start + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p, device=device)
            mask[i, width - len(p):] = 1
        steps = max(n for _, n in batch)
        sync(device)
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                       do_sample=False, pad_token_id=0)
        sync(device)
        elapsed += time.perf_counter() - t0
        useful += sum(n for _, n in batch)
        num_requests += len(batch)
        if elapsed > time_limit_s:
            break
    return {"seconds": elapsed, "output_tokens": useful, "output_tok_per_s": useful / elapsed,
            "num_requests": num_requests, "batch_size": batch_size}


def check_against_transformers(out_dir: str) -> dict[str, Any]:
    """Correctness of the device path before timing it: greedy tokens of the engine (CUDA graphs on,
    Triton decode) vs transformers `generate` on a tiny random model in float32 and bfloat16, `score()`
    vs transformers' log-probabilities, and the paged-decode kernel vs the torch path at 8B head shapes."""
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from terse.backend.local.attention import paged_decode_torch
    from terse.backend.local.paged_decode import paged_decode_triton
    from tests.tiny_models import (  # (not tests.backend.local: it turns on Triton's interpreter)
        CORPUS,
        build_tiny_model,
    )

    report: dict[str, Any] = {}
    path = build_tiny_model(Path(tempfile.mkdtemp()), "qwen3")
    rng = np.random.default_rng(5)
    words = " ".join(CORPUS).split()
    prompts = [" ".join(rng.choice(words, int(rng.integers(1, 40)))) for _ in range(24)]
    for dtype in ("float32", "bfloat16"):
        ref = SimpleNamespace(
            model=AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to("cuda").eval(),
            tokenizer=AutoTokenizer.from_pretrained(path),
        )
        ref.model.generation_config.eos_token_id = None
        engine = LocalEngine.from_spec(str(path), dtype=dtype, max_num_batched_tokens=64, max_num_seqs=32)
        outs = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
        same = 0
        for prompt, out in zip(prompts, outs):
            ids = ref.tokenizer(prompt).input_ids
            with torch.no_grad():
                gen = ref.model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, do_sample=False,
                                         pad_token_id=0)
            same += int(gen[0, len(ids):].tolist() == list(out.token_ids))
        (score,) = engine.score([prompts[0]], prefix="Question:")
        full = ref.tokenizer("Question:").input_ids + list(score.token_ids)
        with torch.no_grad():
            logits = ref.model(torch.tensor([full], device="cuda")).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        n0 = len(full) - len(score.token_ids)
        expected = [lp[n0 - 1 + i, t].item() for i, t in enumerate(score.token_ids)]
        report[dtype] = {
            "greedy_sequences_identical": f"{same}/{len(prompts)}",
            "score_max_abs_diff": max(abs(a - b) for a, b in zip(expected, score.logprobs)),
            "cuda_graphs": engine.runner.graphs is not None, "triton_decode": engine.runner.use_triton_decode,
        }
        engine.close()
        print("check", dtype, report[dtype], flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(2, 4096, 16, 8, 128, device="cuda", generator=gen).to(torch.bfloat16)
    q = torch.randn(64, 32, 128, device="cuda", generator=gen).to(torch.bfloat16)
    tables = torch.randperm(4096, device="cuda", generator=gen)[: 64 * 64].view(64, 64)
    lens = torch.randint(1, 64 * 16 + 1, (64,), device="cuda", generator=gen).to(torch.int32)
    got = paged_decode_triton(q, kv, tables, lens).float()
    want = paged_decode_torch(q.float(), kv.float(), tables, lens)
    report["paged_decode_bf16_rel_err"] = ((got - want).norm() / want.norm()).item()
    print("check kernel", report["paged_decode_bf16_rel_err"], flush=True)
    with open(f"{out_dir}/engine_check_gpu.json", "w") as f:
        json.dump(report, f, indent=2)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--prompt-median", type=int, default=300)
    ap.add_argument("--output-median", type=int, default=200)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--hf-time-limit", type=float, default=60.0)
    ap.add_argument("--kv-cache-memory", type=float, default=0.5)
    ap.add_argument("--out", default="")
    ap.add_argument("--check-dir", default="", help="run the CUDA correctness check first; JSON goes here")
    args = ap.parse_args()
    if args.check_dir:
        try:
            check_against_transformers(args.check_dir)
        except Exception:  # report and go on to the timings: one device call holds both
            traceback.print_exc()

    on_gpu = torch.cuda.is_available()
    config = EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096,
                          kv_cache_memory=args.kv_cache_memory, enable_prefix_cache=False)
    t0 = time.perf_counter()
    engine = LocalEngine.from_random(model_config(args.shape), config)
    build_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "shape": args.shape, "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "dtype": str(engine.dtype), "torch": torch.__version__, "num_kv_blocks": engine.num_kv_blocks,
        "build_s": build_s, "args": vars(args),
    }
    result["decode_batch1"] = bench_decode(engine, args.decode_tokens)
    print("decode", result["decode_batch1"], flush=True)
    work = mixed_workload(args.num_requests, engine.model_config.vocab_size, 0, args.prompt_median,
                          args.output_median, max_prompt=1024, max_output=512)
    bench_mixed_terse(engine, work[:8])  # warm-up (kernel compiles)
    result["mixed_terse"] = bench_mixed_terse(engine, work)
    result["mixed_terse"]["engine_stats"] = engine.stats
    print("terse", result["mixed_terse"], flush=True)
    hf = hf_twin(engine)
    result["mixed_hf"] = bench_mixed_hf(hf, work, args.hf_batch_size, engine.device, args.hf_time_limit)
    print("hf", result["mixed_hf"], flush=True)
    result["speedup_vs_hf"] = result["mixed_terse"]["output_tok_per_s"] / result["mixed_hf"]["output_tok_per_s"]
    engine.close()
    d = result["decode_batch1"]
    print("\n| shape | decode ms/token (batch 1) | bound ms/token | % of bound | terse tok/s | hf tok/s | speedup |")
    print(f"| {args.shape} | {d['decode_s_per_token'] * 1e3:.2f} | {d['bandwidth_bound_s_per_token'] * 1e3:.2f} | "
          f"{100 * d['fraction_of_bound']:.0f}% | {result['mixed_terse']['output_tok_per_s']:.0f} | "
          f"{result['mixed_hf']['output_tok_per_s']:.0f} | {result['speedup_vs_hf']:.1f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
