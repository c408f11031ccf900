"""Structured-output benchmarks: grammar-mask cost per decode step, decode speed with and without
constraints, and the validity of JSON-mode, JSON-schema and tool-call outputs.

    PYTHONPATH=. python bench/structured.py --out bench/results/structured_cpu.json                  # CPU
    PYTHONPATH=. python bench/structured.py --device cuda --shape 8b --out $OUT/structured_h200.json # H200

Mask cost: B grammar states (a JSON schema with nested objects, arrays, enums, numbers and strings)
walked along random allowed tokens; per step we time filling the B masks (llguidance, its thread pool)
and applying them to [B, V] logits on the device. Tokenizers: the reference model's (4K tokens) and a
128K-token byte-level BPE built here (no downloads). Decode: the engine over B requests, every request
exactly N new tokens, free (ignore_eos) vs constrained (a JSON array of at least N integers), same run.
Validity: json_object / json_schema / tool calls on the reference model and tiny random models.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from terse.backend.constraints import (
    JsonObjectConstraint,
    JsonSchemaConstraint,
    ToolCallConstraint,
    ToolSpec,
    parse_tool_calls,
)
from terse.backend.grammar import GrammarCompiler, bitmask_width, fill_bitmask
from terse.backend.local.config import EngineConfig
from terse.backend.local.engine import LocalEngine
from terse.backend.local.models.llama import ModelConfig
from terse.backend.sampling import apply_token_bitmask
from terse.backend.tokenization import load_tokenizer
from terse.backend.types import SamplingParams
from terse.models import reference_model_path
from terse.pipelines.server.structured import StructuredRequest, prompt_messages
from tests.backend.structured_cases import SCHEMAS, SUM_TOOL, WEATHER_TOOL

SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               head_dim=128, vocab_size=128256, rope_theta=500000.0),
    # the reference model's shape (8 layers, hidden 256) with a 128K vocabulary: the lm_head and the masks
    # are as wide as a Llama-3 model's, on CPU
    "ref-128k": dict(hidden_size=256, intermediate_size=640, num_layers=8, num_heads=8, num_kv_heads=2,
                     head_dim=32, vocab_size=128256, rope_theta=500000.0),
}
MASK_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "title": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "maxItems": 8},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                   "score": {"type": "number"}}, "required": ["name", "score"]},
    },
    "required": ["id", "title", "tags", "owner"],
}


def bpe_128k(vocab_size: int = 128000, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE with `vocab_size` tokens built here: the 256 byte symbols, then merges that grow
    random words (with and without a leading space, lower and capitalised) one symbol at a time, as BPE
    training on text grows word pieces."""
    rng = random.Random(seed)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(sorted(alphabet))}
    merges: list[tuple[str, str]] = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < vocab_size - 2:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 11)))
        word = word.capitalize() if rng.random() < 0.2 else word
        word = ("Ġ" + word) if rng.random() < 0.6 else word  # Ġ: the byte-level symbol of a space
        piece = word[0]
        for ch in word[1:]:
            merged = piece + ch
            if merged not in vocab and len(vocab) < vocab_size - 2:
                vocab[merged] = len(vocab)
                merges.append((piece, ch))
            piece = merged
    for special in ("<|begin|>", "<|end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mask_cost(tok: PreTrainedTokenizerFast, vocab: int, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    """Median per-step time to fill `batch` masks and to apply them to [batch, vocab] logits."""
    eos = int(tok.eos_token_id)
    compiler = GrammarCompiler(tok, vocab, [eos])
    constraint = JsonSchemaConstraint.of(MASK_SCHEMA, strict=True)
    t0 = time.perf_counter()
    compiler.compile(constraint)
    first_compile_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    states = [compiler.compile(constraint) for _ in range(batch)]
    cached_compile_ms = (time.perf_counter() - t0) * 1e3 / batch
    rng = np.random.default_rng(0)
    bitmask = torch.zeros(batch, bitmask_width(vocab), dtype=torch.int32, pin_memory=device.type == "cuda")
    logits = torch.randn(batch, vocab, device=device)
    rows = list(range(batch))
    fills, applies = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        fill_bitmask(states, bitmask)
        t1 = time.perf_counter()
        apply_token_bitmask(logits, bitmask, rows)
        _sync(device)
        t2 = time.perf_counter()
        fills.append(t1 - t0)
        applies.append(t2 - t1)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
        for i in rows:  # walk each state along a random allowed token (EOS last: keep the walk going)
            allowed = np.flatnonzero(bits[i])
            choices = allowed[allowed != eos] if len(allowed) > 1 else allowed
            if states[i].advance(int(rng.choice(choices))) or int(choices[0]) == eos:
                states[i] = compiler.compile(constraint)
    fill_us = statistics.median(fills) * 1e6
    return {"batch": batch, "vocab": vocab, "fill_us": fill_us, "fill_us_per_row": fill_us / batch,
            "apply_us": statistics.median(applies) * 1e6, "first_compile_ms": first_compile_ms,
            "cached_compile_ms": cached_compile_ms}


def decode_speed(engine: LocalEngine, batch: int, num_new: int, repeats: int) -> dict[str, float]:
    """Wall ms per decode step for `batch` requests of exactly `num_new` tokens, free vs constrained."""
    rng = random.Random(batch)
    vocab = min(len(engine.tokenizer), engine.model_config.vocab_size) if engine.tokenizer is not None else 1000
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(64)] for _ in range(batch)]
    array = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": num_new}
    kinds = {
        "free": SamplingParams(max_tokens=num_new, ignore_eos=True),
        "constrained": SamplingParams(max_tokens=num_new, constraint=JsonSchemaConstraint.of(array)),
    }
    out: dict[str, float] = {"batch": batch, "num_new": num_new}
    for name, params in kinds.items():
        engine.generate(prompts[:2], params)  # warm-up
        times = []
        for r in range(repeats):
            fresh = [[r + 1, *p] for p in prompts]  # no prefix-cache hits between repeats
            steps0 = engine.num_steps
            t0 = time.perf_counter()
            results = engine.generate(fresh, params)
            wall = time.perf_counter() - t0
            assert all(len(c.token_ids) == num_new for c in results), [len(c.token_ids) for c in results]
            times.append(wall / (engine.num_steps - steps0))
        out[f"{name}_ms_per_step"] = statistics.median(times) * 1e3
        out[f"{name}_tokens_per_s"] = batch / statistics.median(times)
    out["constrained_over_free"] = out["constrained_ms_per_step"] / out["free_ms_per_step"]
    return out


def _tool_prompt(engine: LocalEngine, tools: ToolCallConstraint, question: str) -> str:
    messages = prompt_messages([{"role": "user", "content": question}], None, StructuredRequest(tools, tools))
    return engine.render_chat(messages)


def validity(engine: LocalEngine, label: str, num_prompts: int, max_tokens: int) -> list[dict[str, Any]]:
    """Share of outputs that parse and validate, per kind (greedy and sampled at temperature 0.8)."""
    questions = [f"Record {i}: describe the item, its owner and its tags." for i in range(num_prompts)]
    chats = [engine.render_chat([{"role": "user", "content": q}]) for q in questions]
    tools = ToolCallConstraint((ToolSpec.of("get_weather", WEATHER_TOOL["function"]["parameters"]),
                                ToolSpec.of("add", SUM_TOOL["function"]["parameters"])), "required", max_calls=1)
    by_name = {"get_weather": WEATHER_TOOL, "add": SUM_TOOL}
    cases: list[tuple[str, Any, list[str], Any]] = [("json_object", JsonObjectConstraint(), chats, None)]
    cases += [(f"json_schema:{n}", JsonSchemaConstraint.of(s), chats, s) for n, s in SCHEMAS.items()]
    cases.append(("tool_calls", tools, [_tool_prompt(engine, tools, q) for q in questions], None))
    rows = []
    for kind, constraint, prompts, schema in cases:
        num_valid = num_length = 0
        total = 0
        for temperature in (0.0, 0.8):
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=7, constraint=constraint)
            for out in engine.generate(prompts, params):
                total += 1
                num_length += out.finish_reason == "length"
                num_valid += _is_valid(out.text, kind, schema, by_name)
        finished = total - num_length
        rows.append({"model": label, "kind": kind, "outputs": total, "valid": num_valid,
                     "validity": num_valid / total, "hit_max_tokens": num_length,
                     "validity_of_finished": (num_valid / finished) if finished else None})
    return rows


def _is_valid(text: str, kind: str, schema: Any, tools: dict[str, Any]) -> bool:
    import jsonschema  # (dev extra) only the validity part needs it

    try:
        if kind == "tool_calls":
            calls = parse_tool_calls(text) or []
            for name, arguments in calls:
                jsonschema.validate(json.loads(arguments), tools[name]["function"]["parameters"])
            return bool(calls)
        value = json.loads(text)
        if schema is not None:
            jsonschema.validate(value, schema)
        return isinstance(value, dict)
    except (ValueError, jsonschema.ValidationError, KeyError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="ref-128k", choices=sorted(SHAPES), help="random-weight shape for the 128K rows")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--mask-steps", type=int, default=200)
    ap.add_argument("--num-new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--validity-prompts", type=int, default=16, help="0 skips the validity part")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    reference_tok = load_tokenizer(reference_model_path())
    t0 = time.perf_counter()
    big_tok = bpe_128k()
    results: dict[str, Any] = {
        "command": "PYTHONPATH=. python bench/structured.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "hardware": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "llguidance": __import__("llguidance").__version__,
        "bpe_128k_build_s": time.perf_counter() - t0, "mask_cost": [], "decode": [], "validity": [],
    }
    for name, tok, vocab in (("reference-4k", reference_tok, 4096), ("bpe-128k", big_tok, SHAPES[args.shape]["vocab_size"])):
        for batch in batches:
            row = {"tokenizer": name, **mask_cost(tok, vocab, batch, args.mask_steps, device)}
            print(json.dumps(row))
            results["mask_cost"].append(row)
    engines: list[tuple[str, LocalEngine]] = []
    max_seqs = max(batches)
    if device.type == "cpu":
        engines.append(("reference", LocalEngine.from_spec(str(reference_model_path()), device="cpu", dtype="float32",
                                                            num_kv_blocks=max_seqs * 8 + 64, max_model_len=1024)))
    shape_cfg = ModelConfig(
        architecture="LlamaForCausalLM", rms_norm_eps=1e-5, rope_scaling=None, max_position_embeddings=1024,
        attention_bias=False, qk_norm=False, mlp_bias=False, tie_word_embeddings=False, sliding_window=None,
        bos_token_id=None, eos_token_ids=(int(big_tok.eos_token_id),), **SHAPES[args.shape],
    )
    cfg = EngineConfig(device=device.type, dtype=dtype, max_model_len=1024, max_num_seqs=max_seqs,  # type: ignore[arg-type]
                       num_kv_blocks=max_seqs * 8 + 64)
    for tok_name, tok in (("bpe-128k", big_tok), ("reference-4k", reference_tok)):
        engines.append((f"random {args.shape} + {tok_name}", LocalEngine.from_random(shape_cfg, cfg, tokenizer=tok)))
        if device.type == "cpu":
            break  # on CPU the 128K row is the one that differs from the reference model
    for label, engine in engines:
        for batch in batches:
            row = {"engine": label, **decode_speed(engine, batch, args.num_new, args.repeats)}
            print(json.dumps(row))
            results["decode"].append(row)
        if label != "reference":
            engine.close()
    ref_engine = engines[0][1] if device.type == "cpu" else LocalEngine.from_spec(
        str(reference_model_path()), device=device.type, num_kv_blocks=512, max_model_len=2048)
    subjects: list[tuple[str, LocalEngine]] = [("reference", ref_engine)]
    from tests.tiny_models import build_tiny_model

    for arch, seed in (("llama", 0), ("llama", 1), ("qwen2", 2), ("mistral", 3)):
        path = build_tiny_model(Path(tempfile.mkdtemp(prefix="terse-bench-")), arch, seed=seed)
        subjects.append((f"tiny random {arch} seed {seed}", LocalEngine.from_spec(str(path), device=device.type,
                                                                                   num_kv_blocks=512, max_model_len=2048)))
    for label, engine in subjects:
        for row in validity(engine, label, args.validity_prompts, max_tokens=256) if args.validity_prompts else []:
            print(json.dumps(row))
            results["validity"].append(row)
        engine.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
