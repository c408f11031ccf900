"""INT4 weight-only quantization (W4A16): quality on CPU, memory and speed on the GPU.

    PYTHONPATH=. python bench/quantization.py --part cpu --out bench/results/quantization_cpu.json
    PYTHONPATH=. python bench/quantization.py --part gpu --out $OUT/quantization_gpu.json      # H200
    PYTHONPATH=. python bench/quantization.py --plot bench/results/quantization_gpu.json      # the figure

CPU (the reference model): perplexity on test-split synthetic documents, dense (float32, bfloat16) vs
INT4 (round-to-nearest and AWQ, several group sizes / schemes), AWQ calibrated on train-split documents;
doc-QA exact match on the test split (full contexts, >= 4 worlds) through bench/quality.py's machinery;
kernel-vs-reference error under the Triton interpreter.

GPU (8B shape, random weights, one run): the W4A16 kernels vs the dequantized float32 reference at
the 8B projection shapes (every candidate plan, bfloat16); the INT4 engine vs transformers on the
dequantized weights (tiny model, float32 and bfloat16); then the bf16 engine, transformers'
static-cache `generate` on the same bf16 weights, and the INT4 engine: weight bytes, batch-1 decode,
batch-32 decode step, prefill throughput; per-projection kernel times vs bf16 `F.linear`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TARGETS = {"weights_gb": 5.5, "decode_ms": 2.2, "step32_ratio": 1.3, "prefill_ratio": 0.7, "ppl_pct": 3.0, "em_points": 1.0}
PPL_CONFIGS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "int4-rtn-g128": {"group_size": 128, "awq": False},
    "int4-awq-g128": {"group_size": 128},
    "int4-awq-g64-sym": {"group_size": 64, "scheme": "sym"},
    "int4-awq-g32": {"group_size": 32},
    "int4-awq-g128-head-embed": {"group_size": 128, "lm_head": True, "embeddings": True},
}
QA_CONFIGS = ("dense", "int4-rtn-g128", "int4-awq-g128")


# -- CPU: quality on the reference model ------------------------------------------------------------
def calibration_texts(num_docs: int = 24) -> tuple[str, ...]:
    """Train-split documents (never the test split the quality figures use)."""
    from terse.synth import SplitConfig, build_split

    data = build_split("train", SplitConfig(num_worlds=1, needle_lengths=(), needle_depths=()))
    return tuple(d.text for d in data.documents if d.kind != "haystack")[:num_docs]


def reference_engine(dtype: str, quantization: dict[str, Any] | None, calibration: tuple[str, ...]) -> Any:
    import terse
    from terse.models import reference_model_path

    options: dict[str, Any] = {"dtype": dtype, "num_kv_blocks": 4096, "device": "cpu"}
    if quantization is not None:
        options["quantization"] = {"calibration_prompts": calibration, "calibration_tokens": 4096, **quantization}
    return terse.load_backend(f"local:{reference_model_path()}", **options)


def perplexity(engine: Any, texts: list[str]) -> float:
    scores = engine.score(texts)
    logprobs = [lp for s in scores for lp in s.logprobs if not math.isnan(lp)]
    return math.exp(-sum(logprobs) / len(logprobs))


def cpu_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from quality import Setting, run_setting

    from terse.synth import SplitConfig, build_split

    data = build_split("test", SplitConfig(num_worlds=max(args.worlds, 1), needle_lengths=(512, 1024, 2048, 4096),
                                           needle_depths=(0.0, 0.5, 1.0)))
    docs = [d.text for d in data.documents if d.kind != "haystack"][: args.ppl_docs]
    calibration = calibration_texts()
    result: dict[str, Any] = {"hardware": f"CPU ({platform.machine()})", "torch": torch.__version__,
                              "num_worlds": args.worlds, "ppl_docs": len(docs), "perplexity": {}, "docqa": {},
                              "quantize_s": {}}
    for dtype in ("float32", "bfloat16"):
        for name, quantization in PPL_CONFIGS.items():
            if dtype == "bfloat16" and name not in ("dense", "int4-awq-g128"):
                continue
            key = f"{name}/{dtype}"
            t0 = time.perf_counter()
            engine = reference_engine(dtype, quantization, calibration)
            result["quantize_s"][key] = time.perf_counter() - t0
            result["perplexity"][key] = perplexity(engine, docs)
            print(f"[quantization] perplexity {key}: {result['perplexity'][key]:.4f}", flush=True)
            if dtype == "float32" and name in QA_CONFIGS and args.worlds > 0:
                run = run_setting(Setting("full"), engine, data)
                result["docqa"][name] = {k: run[k] for k in ("exact_match", "num_questions", "seconds_per_question")}
                print(f"[quantization] doc-QA {name}: {run['exact_match']}", flush=True)
            engine.close()
            _write(args.out, result)
    result["kernel_error_interpreter"] = kernel_errors_interpreter()
    return result


def kernel_errors_interpreter() -> dict[str, float]:
    """Relative error of each kernel against the float32 dequantized reference (small shapes)."""
    import torch

    from terse.backend.local.quant.rtn import quantize_weight
    from terse.kernels.w4a16_gemm import w4a16_dequantize, w4a16_gemm
    from terse.kernels.w4a16_gemv import w4a16_gemv
    from terse.kernels.w4a16_layout import dequantize

    out: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        w = quantize_weight(torch.randn(192, 520, generator=gen) * 0.05, 64, "asym", dtype)
        for m in (1, 7, 40):
            x = torch.randn(m, 520, generator=gen).to(dtype)
            want = x.float() @ dequantize(w, torch.float32)
            got = w4a16_gemv(x, w, block_n=64, block_k=64, split_k=3) if m == 1 else \
                w4a16_gemm(x, w, block_m=16, block_n=64, block_k=64, split_k=2)
            out[f"{'gemv' if m == 1 else 'gemm'}/M={m}/{str(dtype)[6:]}"] = _rel(got, want)
        out[f"dequant/{str(dtype)[6:]}"] = _rel(w4a16_dequantize(w), dequantize(w, torch.float32))
    return out


# -- GPU: kernels, parity, memory and speed on the 8B shape -------------------------------------------
def _rel(got: Any, want: Any) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-12))


def kernel_check_gpu() -> dict[str, float]:
    """16-bit products vs the float32 dequantized product: every candidate plan at the 8B q/k/v shape in
    bfloat16 (group 128, asymmetric: the plans the INT4 engine then picks from, so their compilation is paid
    here once), the gemv / gemm / dequant paths at the down_proj shape with group 32, symmetric, and every
    column GEMV tile in float16 and bfloat16, ragged shapes included."""
    import torch

    from terse.backend.local.quant.rtn import quantize_weight
    from terse.kernels.w4a16 import Plan, candidate_plans, heuristic_plan, run_plan
    from terse.kernels.w4a16_layout import dequantize

    out: dict[str, float] = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for (n, k), group, scheme, every_plan in (((6144, 4096), 128, "asym", True), ((4096, 14336), 32, "sym", False)):
        w = quantize_weight(torch.randn(n, k, device="cuda", generator=gen) * 0.02, group, scheme, torch.bfloat16)
        dense = dequantize(w, torch.float32)
        for m in (1, 5, 48, 300, 2048):
            x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
            want = x.float() @ dense
            bucket = 1 << (m - 1).bit_length()
            plans = candidate_plans(bucket, w, num_sms) if every_plan else [heuristic_plan(bucket, w, num_sms), Plan("dequant")]
            for plan in plans:
                out[f"{n}x{k}/g{group}-{scheme}/M={m}/{plan.describe()}"] = _rel(run_plan(plan, x, w, None), want)
    # the one-row column GEMV's tiles in both 16-bit dtypes, also at ragged shapes (N = 200; K = 544 ends inside
    # a step of two groups of 32)
    from terse.kernels.w4a16 import COLUMN_TILES, _column

    for dtype in (torch.float16, torch.bfloat16):
        for (n, k), group, scheme in (((6144, 4096), 128, "asym"), ((200, 512), 128, "asym"), ((6144, 4096), 32, "sym"),
                                      ((200, 512), 32, "sym"), ((200, 544), 32, "sym")):
            w = quantize_weight(torch.randn(n, k, device="cuda", generator=gen) * 0.02, group, scheme, dtype)
            x = torch.randn(1, k, device="cuda", generator=gen).to(dtype)
            want = x.float() @ dequantize(w, torch.float32)
            for plan in dict.fromkeys(_column(*tile, w, num_sms, 1) for tile in COLUMN_TILES):
                out[f"{n}x{k}/g{group}-{scheme}/{dtype}/M=1/{plan.describe()}"] = _rel(run_plan(plan, x, w, None), want)
    worst = max(out.values())
    print(f"[quantization] kernel check: {len(out)} runs, worst relative error {worst:.2e}", flush=True)
    return out


def engine_check_gpu() -> dict[str, Any]:
    """INT4 engine (AWQ, CUDA kernels, CUDA graphs) vs transformers on the dequantized weights."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from terse.backend.local.engine import LocalEngine
    from terse.backend.local.quant.checkpoint import save_dequantized
    from terse.backend.types import SamplingParams
    from tests.tiny_models import CORPUS, build_tiny_model

    path = build_tiny_model(Path(tempfile.mkdtemp()), "qwen3", hidden_size=128, num_heads=4, num_kv_heads=2)
    words = " ".join(CORPUS).split()
    prompts = [" ".join(words[(7 * i) % len(words):][: 5 + i]) for i in range(16)]
    report: dict[str, Any] = {}
    for dtype in ("float32", "bfloat16"):
        engine = LocalEngine.from_spec(str(path), dtype=dtype, max_num_seqs=16, num_kv_blocks=512,
                                       quantization={"group_size": 32, "calibration_tokens": 512})
        dense = save_dequantized(engine.runner.model, path, Path(tempfile.mkdtemp()), getattr(torch, dtype))
        ref = AutoModelForCausalLM.from_pretrained(dense, dtype=getattr(torch, dtype)).to("cuda").eval()
        ref.generation_config.eos_token_id = None
        tok = AutoTokenizer.from_pretrained(dense)
        outs = engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True))
        same = 0
        for prompt, out in zip(prompts, outs):
            ids = tok(prompt).input_ids
            with torch.no_grad():
                gen = ref.generate(torch.tensor([ids], device="cuda"), max_new_tokens=16, do_sample=False,
                                   pad_token_id=0)
            same += int(gen[0, len(ids):].tolist() == list(out.token_ids))
        report[dtype] = {"greedy_sequences_identical": f"{same}/{len(prompts)}",
                         "cuda_graphs": engine.runner.graphs is not None}
        print(f"[quantization] engine check {dtype}: {report[dtype]}", flush=True)
        engine.close()
    return report


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_engine(engine: Any, vocab: int, prefill_prompts: int, prefill_len: int) -> dict[str, Any]:
    """Batch-1 decode and batch-32 decode step (ms), prefill throughput (tokens/s); random prompts."""
    import numpy as np

    from terse.backend.local.quant.modules import weight_bytes
    from terse.backend.types import SamplingParams

    rng = np.random.default_rng(0)

    def decode_ms(batch: int, new: int) -> float:
        runs = []
        for _ in range(3):
            prompts = [rng.integers(0, vocab, 128).tolist() for _ in range(batch)]
            outs = engine.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
            runs.append((max(o.metrics["latency"] for o in outs) - max(o.metrics["ttft"] for o in outs)) / (new - 1))
        return statistics.median(runs) * 1e3

    def prefill_tok_s() -> float:
        prompts = [rng.integers(0, vocab, prefill_len).tolist() for _ in range(prefill_prompts)]
        _sync()
        t0 = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=1))
        _sync()
        return prefill_prompts * prefill_len / (time.perf_counter() - t0)

    for batch in (1, 32):  # warm-up: kernel choice and compilation
        decode_ms(batch, 8)
    prefill_tok_s()
    row = {"weight_bytes": weight_bytes(engine.runner.model), "decode_ms_batch1": decode_ms(1, 128),
           "step_ms_batch32": decode_ms(32, 64), "prefill_tok_s": statistics.median(prefill_tok_s() for _ in range(3))}
    print(f"[quantization] engine {row}", flush=True)
    return row


class StepTimes:
    """A transformers logits processor noting when each generation step reaches sampling."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        _sync()
        self.times.append(time.perf_counter())
        return scores


def hf_static_decode_ms(model: Any, vocab: int, new: int = 128) -> dict[str, float]:
    """transformers `generate` with a static cache at batch 1: median step interval after a warm-up
    call at the same shape (the warm-up compiles the decode step)."""
    import torch
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, 128), device=device)
    kwargs: dict[str, Any] = {"do_sample": False, "cache_implementation": "static", "pad_token_id": 0,
                              "attention_mask": torch.ones_like(ids), "max_new_tokens": new, "min_new_tokens": new}
    if device.type != "cuda":
        kwargs["disable_compile"] = True  # (dry runs on the CPU)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, **kwargs)
        warmup = time.perf_counter() - t0
        timer = StepTimes()
        model.generate(ids, logits_processor=LogitsProcessorList([timer]), **kwargs)
    steps = [b - a for a, b in zip(timer.times, timer.times[1:])][2:]
    row = {"decode_ms_batch1": statistics.median(steps) * 1e3, "warmup_s": warmup}
    print(f"[quantization] transformers static {row}", flush=True)
    return row


def kernel_times(model: Any, shapes: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """Per projection shape and M: the INT4 layer (its chosen plan) vs bf16 F.linear, ms per call inside
    a CUDA graph of back-to-back calls over weight copies larger than the L2 cache (launch-free, as in
    the engine's decode graphs; terse/kernels/w4a16_timing.py)."""
    import torch

    from terse.backend.local.quant.modules import Int4Linear
    from terse.kernels.w4a16_layout import Int4Weight
    from terse.kernels.w4a16_timing import graph_ms, rotating_copies

    layers = {f"{m.out_features}x{m.in_features}": m for m in model.modules() if isinstance(m, Int4Linear)}
    out: dict[str, Any] = {}
    device = torch.device("cuda")
    for name, (n, k) in shapes.items():
        layer = layers.get(f"{n}x{k}")
        if layer is None:
            continue
        nbytes = layer.int4.nbytes()
        copies = [layer] + [Int4Linear(Int4Weight(layer.qweight.clone(), layer.scales.clone(),
                                                  None if layer.zeros is None else layer.zeros.clone(), layer.group_size))
                            for _ in range(rotating_copies(nbytes, device, most=8) - 1)]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                 for _ in range(rotating_copies(n * k * 2, device, most=8))]
        for m in (1, 32, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            layer(x)  # choose the plan
            int4 = graph_ms([lambda x=x, c=c: c(x) for c in copies], min_calls=8 if m > 64 else 24)
            bf16 = graph_ms([lambda x=x, d=d: torch.nn.functional.linear(x, d) for d in dense],
                            min_calls=8 if m > 64 else 24)
            out[f"{name}/M={m}"] = {"int4_ms": int4, "bf16_ms": bf16, "speedup": bf16 / int4,
                                    "int4_GBps": nbytes / int4 / 1e6 if m == 1 else None,
                                    "bf16_GBps": n * k * 2 / bf16 / 1e6 if m == 1 else None}
            print(f"[quantization] kernel {name} M={m}: int4 {int4 * 1e3:.1f} us, bf16 {bf16 * 1e3:.1f} us "
                  f"(launch-free)", flush=True)
        del copies, dense
    return out


def gpu_part(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    import triton
    from engine import hf_twin, model_config

    from terse.backend.local.config import EngineConfig
    from terse.backend.local.engine import LocalEngine
    from terse.backend.local.quant.config import QuantizationConfig
    from terse.kernels.w4a16 import chosen_plans

    on_gpu = torch.cuda.is_available()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if on_gpu else "cpu (dry run)", "shape": args.shape,
                              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                                           "transformers": transformers.__version__}}
    if on_gpu and not args.skip_checks:
        result["kernel_check"] = kernel_check_gpu()
        result["engine_check"] = engine_check_gpu()
        _write(args.out, result)
    config = model_config(args.shape, max_len=4096)
    engine_config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192, max_model_len=4096,
                                 num_kv_blocks=4096, enable_prefix_cache=False)
    vocab = config.vocab_size
    bf16 = LocalEngine.from_random(config, engine_config)
    result["bf16"] = measure_engine(bf16, vocab, args.prefill_prompts, args.prefill_len)
    _write(args.out, result)
    if not args.skip_hf:
        twin = hf_twin(bf16)
        result["transformers_static"] = hf_static_decode_ms(twin, vocab)
        del twin
    bf16.close()
    del bf16
    gc.collect()
    torch.cuda.empty_cache()
    _write(args.out, result)
    for name, quantization in (("int4", QuantizationConfig(awq=False, lm_head=True)),
                               ("int4-dense-head", QuantizationConfig(awq=False))):
        if name != "int4" and args.skip_dense_head:
            continue
        t0 = time.perf_counter()
        engine = LocalEngine.from_random(config, replace(engine_config, quantization=quantization))
        build_s = time.perf_counter() - t0
        result[name] = {"build_s": build_s, **measure_engine(engine, vocab, args.prefill_prompts, args.prefill_len)}
        if name == "int4" and on_gpu:
            h, i = config.hidden_size, config.intermediate_size
            q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
            shapes = {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * i, h), "down": (h, i), "lm_head": (vocab, h)}
            result["kernel_times"] = kernel_times(engine.runner.model, shapes)
            result["plans"] = {str(k): {"plan": p.describe(), "candidates_ms": t} for k, (p, t) in chosen_plans().items()}
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        _write(args.out, result)
    result["targets"] = evaluate_targets(result)
    return result


def evaluate_targets(r: dict[str, Any]) -> dict[str, Any]:
    bf16, int4 = r.get("bf16", {}), r.get("int4", {})
    if not bf16 or not int4:
        return {}
    out = {
        "weights_gb": (int4["weight_bytes"] / 1e9, TARGETS["weights_gb"]),
        "decode_ms_batch1": (int4["decode_ms_batch1"], TARGETS["decode_ms"]),
        "step32_vs_bf16": (int4["step_ms_batch32"] / bf16["step_ms_batch32"], TARGETS["step32_ratio"]),
        "prefill_vs_bf16": (int4["prefill_tok_s"] / bf16["prefill_tok_s"], TARGETS["prefill_ratio"]),
    }
    met = {k: (v <= t if k != "prefill_vs_bf16" else v >= t) for k, (v, t) in out.items()}
    if "transformers_static" in r:
        out["speedup_vs_transformers_static"] = (r["transformers_static"]["decode_ms_batch1"] / int4["decode_ms_batch1"], 3.0)
        met["speedup_vs_transformers_static"] = out["speedup_vs_transformers_static"][0] >= 3.0
    return {k: {"value": v, "target": t, "met": met[k]} for k, (v, t) in out.items()}


# -- output -----------------------------------------------------------------------------------------
def _write(path: str, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, path)


def cpu_table(r: dict[str, Any]) -> str:
    dense = r["perplexity"]["dense/float32"]
    lines = ["| configuration | perplexity | vs dense fp32 | doc-QA EM single / multi / list / needle | EM all |",
             "|---|---|---|---|---|"]
    for key, ppl in r["perplexity"].items():
        name = key.split("/")[0]
        qa = r["docqa"].get(name) if key.endswith("float32") else None
        em = overall = ""
        if qa:
            em = " / ".join(f"{qa['exact_match'].get(k, float('nan')):.3f}" for k in ("single", "multi", "list", "needle"))
            n = qa["num_questions"]
            correct = sum(qa["exact_match"][k] * n[k] for k in n)
            overall = f"{correct / sum(n.values()):.3f} ({round(correct)}/{sum(n.values())})"
        lines.append(f"| {key} | {ppl:.4f} | {100 * (ppl / dense - 1):+.2f}% | {em} | {overall} |")
    return "\n".join(lines)


def gpu_table(r: dict[str, Any]) -> str:
    lines = ["| engine | weights GB | decode ms/token (batch 1) | step ms (batch 32) | prefill tok/s |", "|---|---|---|---|---|"]
    for name in ("bf16", "int4", "int4-dense-head"):
        e = r.get(name)
        if e:
            lines.append(f"| {name} | {e['weight_bytes'] / 1e9:.2f} | {e['decode_ms_batch1']:.2f} | "
                         f"{e['step_ms_batch32']:.2f} | {e['prefill_tok_s']:.0f} |")
    if "transformers_static" in r:
        lines.append(f"| transformers static (bf16) | | {r['transformers_static']['decode_ms_batch1']:.2f} | | |")
    targets = [f"target {k}: {t['value']:.3f} (target {t['target']}): {'met' if t['met'] else 'NOT met'}"
               for k, t in r.get("targets", {}).items()]
    return "\n".join(lines) + ("\n\n" + "\n".join(targets) if targets else "")


def plot(path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = json.loads(path.read_text())
    names = [n for n in ("bf16", "int4", "int4-dense-head") if n in r]
    metrics = [("weight_bytes", "weights (GB)", 1e-9), ("decode_ms_batch1", "decode ms/token, batch 1", 1.0),
               ("step_ms_batch32", "decode step ms, batch 32", 1.0), ("prefill_tok_s", "prefill tokens/s", 1.0)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for ax, (key, label, scale) in zip(axes, metrics):
        values = [r[n][key] * scale for n in names]
        ax.bar(names, values, color=["#777", "#2a6", "#6b9"][: len(names)])
        if key == "decode_ms_batch1" and "transformers_static" in r:
            ax.axhline(r["transformers_static"]["decode_ms_batch1"], color="#c33", ls="--", label="transformers static")
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"INT4 (W4A16) vs bf16, 8B shape, {r.get('device', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["cpu", "gpu"])
    parser.add_argument("--out", default="")
    parser.add_argument("--worlds", type=int, default=4, help="CPU: test-split worlds for doc-QA (0: perplexity only)")
    parser.add_argument("--ppl-docs", type=int, default=80, help="CPU: test-split documents scored for perplexity")
    parser.add_argument("--shape", default="8b", help="GPU: model shape of bench/engine.py (tiny: a CPU dry run)")
    parser.add_argument("--prefill-prompts", type=int, default=16)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--skip-checks", action="store_true", help="GPU: skip the kernel and engine checks")
    parser.add_argument("--skip-hf", action="store_true", help="GPU: skip transformers' static-cache baseline")
    parser.add_argument("--skip-dense-head", action="store_true", help="GPU: skip the INT4 engine with a bf16 LM head")
    parser.add_argument("--plot", type=Path, help="draw docs/quantization_8b.png from a GPU result JSON")
    parser.add_argument("--table", type=Path, help="print the table of a result JSON (CPU or GPU part)")
    args = parser.parse_args(argv)
    if args.table:
        saved = json.loads(args.table.read_text())
        print(cpu_table(saved) if "perplexity" in saved else gpu_table(saved))
        return 0
    if args.plot:
        plot(args.plot, ROOT / "docs" / "quantization_8b.png")
        return 0
    if args.part == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel error part runs in the interpreter
        result = cpu_part(args)
        _write(args.out, result)
        print(cpu_table(result))
        print(json.dumps(result["kernel_error_interpreter"], indent=1))
    elif args.part == "gpu":
        result = gpu_part(args)
        _write(args.out, result)
        print(gpu_table(result))
    else:
        parser.error("give --part cpu, --part gpu or --plot FILE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
