"""Decode on the engine's overlapped loop with per-request hooks: free rows, rows asking for logprobs,
grammar-constrained rows and a batch mixing free and constrained requests; one engine, one run.

    PYTHONPATH=. python bench/engine_hooks.py --device cuda --shape 8b --out $OUT/engine_hooks_gpu.json   # H200
    PYTHONPATH=. python bench/engine_hooks.py --shape tiny --batches 1,8 --out bench/results/engine_hooks_cpu.json

Every request generates exactly --num-new tokens after a 128-token random prompt. Kinds, per batch size B:

    free         B free requests (ignore_eos): the loop without any hook (the baseline)
    logprobs     B free requests with logprobs=5 (computed on the device, carried back with the ids)
    constrained  B requests constrained to a JSON array of >= num_new integers (masked + sampled late)
    mixed        B/2 free + B/2 constrained in one batch
    mixed-held   the same batch with constrained sequences held back until their token reached the host
                 (the alternative design: such a sequence decodes one step in two)

Per kind: wall ms per engine step (prefill steps included), and each request's decode rate,
(num_new - 1) / (latency - ttft), median over the requests of that kind. Random bf16 weights on CUDA
(float32 on CPU); the 8b shape uses a 128K byte-level BPE built by bench/structured.py (no downloads), the
tiny shape the reference model's 4K tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from terse.backend.constraints import JsonSchemaConstraint
from terse.backend.local.config import EngineConfig
from terse.backend.local.engine import LocalEngine
from terse.backend.local.sequence import Sequence
from terse.backend.tokenization import load_tokenizer
from terse.backend.types import Completion, SamplingParams
from terse.models import reference_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import model_config
from structured import bpe_128k

PROMPT_LEN = 128


@contextmanager
def constrained_held_back(engine: LocalEngine) -> Iterator[None]:
    """Emulate the alternative design: a constrained sequence is not scheduled while its last token is
    still on the device (it waits for the host, so it decodes every other step)."""
    scheduler = engine.scheduler
    may_decode = scheduler._may_decode

    def held(seq: Sequence) -> bool:
        return not (seq.num_pending_tokens and seq.constraint is not None) and may_decode(seq)

    scheduler._may_decode = held  # type: ignore[method-assign]
    try:
        yield
    finally:
        del scheduler._may_decode  # the class's own again


def _decode_rate(out: Completion, num_new: int) -> float:
    return (num_new - 1) / max(out.metrics["latency"] - out.metrics["ttft"], 1e-9)


def run_kind(engine: LocalEngine, params: list[SamplingParams], num_new: int, repeats: int, vocab: int) -> dict[str, Any]:
    """Median wall ms per step and per-request decode rates (tokens/s) of free and constrained rows."""
    rng = random.Random(len(params))
    step_ms: list[float] = []
    free_rates: list[float] = []
    constrained_rates: list[float] = []
    engine.generate([[1] * 8] * 2, params[0])  # warm-up (schema compile, first step shapes)
    for _ in range(repeats):
        prompts = [[rng.randrange(10, vocab - 10) for _i in range(PROMPT_LEN)] for _p in params]  # no cache hits
        steps0 = engine.num_steps
        t0 = time.perf_counter()
        handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
        outs = [h.result(timeout=600) for h in handles]
        wall = time.perf_counter() - t0
        assert all(len(o.token_ids) == num_new for o in outs), [len(o.token_ids) for o in outs]
        step_ms.append(wall * 1e3 / (engine.num_steps - steps0))
        for sp, out in zip(params, outs):
            (constrained_rates if sp.constraint is not None else free_rates).append(_decode_rate(out, num_new))
    return {
        "ms_per_step": statistics.median(step_ms),
        "free_tokens_per_s_per_request": statistics.median(free_rates) if free_rates else None,
        "constrained_tokens_per_s_per_request": statistics.median(constrained_rates) if constrained_rates else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="tiny", choices=["8b", "1b", "tiny"])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--num-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    tokenizer = load_tokenizer(reference_model_path()) if args.shape == "tiny" else bpe_128k()
    cfg = model_config(args.shape, max_len=1024)
    cfg = dataclasses.replace(cfg, eos_token_ids=(int(tokenizer.eos_token_id),))
    engine_config = EngineConfig(
        device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32", max_model_len=1024,
        max_num_seqs=max(batches), num_kv_blocks=max(batches) * 16 + 64,
    )
    engine = LocalEngine.from_random(cfg, engine_config, tokenizer=tokenizer)
    vocab = min(len(tokenizer), cfg.vocab_size)
    array = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": args.num_new}
    free = SamplingParams(max_tokens=args.num_new, ignore_eos=True)
    logprobs = SamplingParams(max_tokens=args.num_new, ignore_eos=True, logprobs=5)
    constrained = SamplingParams(max_tokens=args.num_new, constraint=JsonSchemaConstraint.of(array))
    rows: list[dict[str, Any]] = []
    for batch in batches:
        half = [free] * (batch - batch // 2) + [constrained] * (batch // 2)
        kinds = {"free": [free] * batch, "logprobs": [logprobs] * batch, "constrained": [constrained] * batch}
        if batch > 1:
            kinds["mixed"] = half
        for name, params in kinds.items():
            row = {"batch": batch, "kind": name, **run_kind(engine, params, args.num_new, args.repeats, vocab)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        if batch > 1:
            with constrained_held_back(engine):
                row = {"batch": batch, "kind": "mixed-held", **run_kind(engine, half, args.num_new, args.repeats, vocab)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    engine.close()
    results = {
        "command": "PYTHONPATH=. python bench/engine_hooks.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "hardware": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    print("\n| batch | kind | ms / step | free tok/s per request | constrained tok/s per request |\n|---|---|---|---|---|")
    for row in rows:
        cells = [row["free_tokens_per_s_per_request"], row["constrained_tokens_per_s_per_request"]]
        print(f"| {row['batch']} | {row['kind']} | {row['ms_per_step']:.2f} | "
              + " | ".join("-" if c is None else f"{c:.0f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
