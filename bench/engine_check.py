"""Correctness on the device before bench/engine.py times anything.

- `check_kernels`: the fused Triton kernels against their torch references at 8B head shapes, in
  bfloat16 (relative error; the residual add and RoPE are bit-exact with torch's op-by-op rounding),
  paged decode at batch 64 and at batch 1 over 32K tokens (split-K), the vocabulary argmax (exact, ties
  and NaN included, repeated launches and a CUDA graph replay).
- `check_engine`: a tiny random Qwen3-style model, engine (CUDA graphs, Triton decode) vs transformers
  `generate` in float32 (greedy identical, the exactness anchor) and bfloat16 (fused kernels; sequences
  identical end to end counted), `score()` vs transformers' log-probabilities.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def check_kernels(device: torch.device) -> dict[str, Any]:
    from terse.kernels import decode_reference as ref
    from terse.kernels.activation import silu_mul_triton
    from terse.kernels.norm import add_rms_norm_triton
    from terse.kernels.paged_decode import paged_decode_triton
    from terse.kernels.rope_store import rope_store_triton

    if device.type != "cuda":
        return {"skipped": "no GPU (the interpreted kernels are tested in tests/kernels)"}
    gen = torch.Generator(device=device).manual_seed(0)
    bf16, report = torch.bfloat16, {}
    x = torch.randn(64, 4096, device=device, generator=gen).to(bf16)
    res = torch.randn(64, 4096, device=device, generator=gen).to(bf16)
    w = (1 + 0.1 * torch.randn(4096, device=device, generator=gen)).to(bf16)
    out, new_res = add_rms_norm_triton(x, res, w, 1e-5)
    want, want_res = ref.add_rms_norm_reference(x, res, w, 1e-5)
    report["add_rms_norm_rel_err"] = _rel(out, want)
    report["add_rms_norm_residual_exact"] = bool(torch.equal(new_res, want_res))
    qkv = torch.randn(64, 48 * 128, device=device, generator=gen).to(bf16)
    q, k, v = (t.view(64, -1, 128) for t in qkv.split([4096, 1024, 1024], dim=-1))
    inv = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, device=device).float() / 128))
    freqs = torch.arange(8192, device=device).float()[:, None] * inv[None, :]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    positions = torch.randint(0, 8192, (64,), device=device, generator=gen)
    slots = torch.randperm(512 * 16, device=device, generator=gen)[:64]
    pool, want_pool = (torch.randn(2, 512, 16, 8, 128, device=device, generator=gen).to(bf16) for _ in range(2))
    want_pool.copy_(pool)
    got_q, got_k = rope_store_triton(q, k, v, cos, sin, positions, pool, slots)
    want_q, want_k = ref.rope_store_reference(q, k, v, cos[positions].to(bf16)[:, None], sin[positions].to(bf16)[:, None],
                                              want_pool, slots)
    report["rope_store_exact"] = bool(torch.equal(got_q, want_q) and torch.equal(got_k, want_k) and torch.equal(pool, want_pool))
    report["rope_store_rel_err"] = _rel(got_q, want_q)
    gate_up = (2 * torch.randn(64, 2 * 14336, device=device, generator=gen)).to(bf16)
    report["silu_mul_rel_err"] = _rel(silu_mul_triton(gate_up), ref.silu_mul_reference(gate_up))
    kv = torch.randn(2, 8192, 16, 8, 128, device=device, generator=gen).to(bf16)
    for name, bs, max_ctx in (("paged_decode_bs64_rel_err", 64, 1024), ("paged_decode_bs1_32k_rel_err", 1, 32768)):
        width = max_ctx // 16
        tables = torch.randperm(8192, device=device, generator=gen)[: bs * width].view(bs, width) if bs * width <= 8192 \
            else torch.randint(0, 8192, (bs, width), device=device, generator=gen)
        lens = torch.randint(1, max_ctx + 1, (bs,), device=device, generator=gen)
        lens[0] = max_ctx
        qd = torch.randn(bs, 32, 128, device=device, generator=gen).to(bf16)
        report[name] = _rel(paged_decode_triton(qd, kv, tables, lens), ref.paged_decode_reference(qd.float(), kv.float(), tables, lens))
    report["argmax_exact"] = _check_argmax(device, gen)
    return report


def _check_argmax(device: torch.device, gen: torch.Generator) -> bool:
    """argmax_rows == torch.argmax at the 8B vocabulary: coarse values (ties across chunks), NaN rows,
    batch 1 and 64, every dtype, eager launches back to back and a captured graph replayed on new data."""
    from terse.kernels.argmax import argmax_rows

    exact = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows in (1, 64):
            logits = torch.randint(-40, 40, (rows, 128256), device=device, generator=gen).to(dtype) / 4
            logits[rows // 2, torch.randint(0, 128256, (3,), device=device, generator=gen)] = float("nan")
            for _ in range(3):
                exact &= torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
            static = logits.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = argmax_rows(static)
            static.copy_(torch.randn(rows, 128256, device=device, generator=gen).to(dtype))
            graph.replay()
            exact &= torch.equal(captured, static.argmax(dim=-1))
    return bool(exact)


def tiny_model(arch: str, num_prompts: int, seed: int = 5) -> tuple[Path, list[str]]:
    """A random tiny model of `arch` in a new temporary directory, and `num_prompts` prompts of 1-39 words
    of its tokenizer's corpus (drawn from `seed`)."""
    from tests.tiny_models import (  # (not tests.backend.local: it turns on Triton's interpreter)
        CORPUS,
        build_tiny_model,
    )

    path = build_tiny_model(Path(tempfile.mkdtemp()), arch)
    rng = np.random.default_rng(seed)
    words = " ".join(CORPUS).split()
    return path, [" ".join(rng.choice(words, int(rng.integers(1, 40)))) for _ in range(num_prompts)]


def check_engine(device: torch.device) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report: dict[str, Any] = {}
    path, prompts = tiny_model("qwen3", 24)
    tok = AutoTokenizer.from_pretrained(path)
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        model.generation_config.eos_token_id = None
        engine = LocalEngine.from_spec(str(path), dtype=dtype, max_num_batched_tokens=64, max_num_seqs=32,
                                       num_kv_blocks=512, device=device.type)
        outs = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
        same = 0
        for prompt, out in zip(prompts, outs):
            ids = tok(prompt).input_ids
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids], device=device), max_new_tokens=24, do_sample=False, pad_token_id=0)
            same += int(gen[0, len(ids):].tolist() == list(out.token_ids))
        (score,) = engine.score([prompts[0]], prefix="Question:")
        full = tok("Question:").input_ids + list(score.token_ids)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full], device=device)).logits[0].float(), -1)
        n0 = len(full) - len(score.token_ids)
        expected = [lp[n0 - 1 + i, t].item() for i, t in enumerate(score.token_ids)]
        report[dtype] = {
            "greedy_sequences_identical": f"{same}/{len(prompts)}",
            "score_max_abs_diff": max(abs(a - b) for a, b in zip(expected, score.logprobs)),
            "cuda_graphs": engine.runner.graphs is not None, "ops": type(engine.runner.model.ops).__name__,
            "decode": engine.runner.attention.decode.__name__,
        }
        engine.close()
    return report
