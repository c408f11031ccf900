"""Structured-output benchmarks: grammar-mask cost per decode step, decode speed with and without
constraints, and the validity of JSON-mode, JSON-schema and tool-call outputs.

    PYTHONPATH=. python bench/structured.py --out bench/results/structured_cpu.json                  # CPU
    PYTHONPATH=. python bench/structured.py --device cuda --shape 8b --parts mask,closing,decode \
        --batches 1,16 --out $OUT/structured_h200.json                                               # H200

Mask cost: B grammar states (a JSON schema with nested objects, arrays, enums, numbers and strings)
walked along random allowed tokens; per step we time filling the B masks (llguidance, its thread pool)
and applying them to [B, V] logits on the device. Tokenizers: the reference model's (4K tokens) and a
128K-token byte-level BPE built here (no downloads). Decode: the engine over B requests of up to N new
tokens, same run: free (ignore_eos, exactly N), constrained (a JSON string the budget closes) and closing
(a JSON array whose shortest output is exactly max_tokens: every step checked).
Closing: host cost per step of the budget logic (decisions, plan checks, checks of sampled tokens) beside
the masks alone. Validity: json_object / json_schema / tool calls on the reference model and tiny random
models, at max_tokens 256 and at each kind's shortest complete output + 8 tokens (budget-aware closing).

    PYTHONPATH=. python bench/structured.py --parts validity --validity-prompts 8 --out ...  # one part
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

import terse.backend.budget as budget_module
from terse.backend.closing import SEARCH_MAX_POPS
from terse.backend.constraints import (
    JsonObjectConstraint,
    JsonSchemaConstraint,
    ToolCallConstraint,
    ToolSpec,
    parse_tool_calls,
)
from terse.backend.grammar import GrammarCompiler, GrammarRows, bitmask_width, fill_bitmask
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


def mask_cost(tok: PreTrainedTokenizerBase, vocab: int, batch: int, steps: int, device: torch.device) -> dict[str, float]:
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
    """Wall ms per engine step and tokens/s for `batch` requests of up to `num_new` tokens, free vs two
    constrained workloads: "constrained" (a JSON string the model writes until the budget closes it: masks,
    plan checks, the close) and "closing" (a JSON array whose minItems make its shortest output exactly the
    budget: every step is a checked step, the worst case for the budget logic)."""
    rng = random.Random(batch)
    vocab = min(len(engine.tokenizer), engine.model_config.vocab_size) if engine.tokenizer is not None else 1000
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(64)] for _ in range(batch)]
    string = JsonSchemaConstraint.of({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]})
    array = JsonSchemaConstraint.of({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "minItems": max(1, num_new // 3)})
    shortest = engine._grammar.compile(array).shortest_len() if engine._grammar is not None else None
    kinds = {
        "free": SamplingParams(max_tokens=num_new, ignore_eos=True),
        "constrained": SamplingParams(max_tokens=num_new, constraint=string),
        "closing": SamplingParams(max_tokens=shortest or num_new, constraint=array),
    }
    out: dict[str, float] = {"batch": batch, "num_new": num_new, "closing_max_tokens": shortest or num_new}
    for name, params in kinds.items():
        engine.generate(prompts[:2], params)  # warm-up
        times, rates, lengths = [], [], []
        for r in range(repeats):
            fresh = [[r + 1, *p] for p in prompts]  # no prefix-cache hits between repeats
            steps0 = engine.num_steps
            t0 = time.perf_counter()
            results = engine.generate(fresh, params)
            wall = time.perf_counter() - t0
            num_tokens = sum(len(c.token_ids) for c in results)
            times.append(wall / (engine.num_steps - steps0))
            rates.append(num_tokens / wall)
            lengths.append(num_tokens / batch)
        out[f"{name}_ms_per_step"] = statistics.median(times) * 1e3
        out[f"{name}_tokens_per_s"] = statistics.median(rates)
        out[f"{name}_tokens_per_request"] = statistics.median(lengths)
    out["constrained_over_free"] = out["constrained_ms_per_step"] / out["free_ms_per_step"]
    out["closing_over_free"] = out["closing_ms_per_step"] / out["free_ms_per_step"]
    return out


def closing_cost(tok: PreTrainedTokenizerBase, vocab: int, batch: int, steps: int) -> dict[str, float]:
    """Host µs per step of the budget logic over `batch` MASK_SCHEMA states walking random allowed tokens:
    "masks", llguidance's masks alone; "free", masks with the budget decisions of rows far from their
    budget (every decision FREE, no plan kept); "check", rows always within their last quick_len + 24
    tokens (decisions, masks, the check of each sampled token, replans and forced closing tokens
    included): the worst case, every row near its max_tokens at every step; "check_full_search", the same
    with the checks' searches given the full SEARCH_MAX_POPS states instead of CHECK_SEARCH_POPS. A walk
    restarts when its grammar or budget ends. Random tokens leave the closing plan far more often than a
    model's do."""
    compiler = GrammarCompiler(tok, vocab, [int(tok.eos_token_id)])
    constraint = JsonSchemaConstraint.of(MASK_SCHEMA, strict=True)
    quick = compiler.compile(constraint).quick_len or 1
    bitmask = torch.zeros(batch, bitmask_width(vocab), dtype=torch.int32)
    out: dict[str, float] = {"batch": batch, "vocab": vocab, "quick_len": quick}
    check_pops = budget_module.CHECK_SEARCH_POPS
    for mode in ("masks", "free", "check", "check_full_search"):
        rng = np.random.default_rng(1)  # every mode walks from the same seed
        budget_module.CHECK_SEARCH_POPS = SEARCH_MAX_POPS if mode == "check_full_search" else check_pops
        states = [compiler.compile(constraint) for _ in range(batch)]
        budgets = [int(rng.integers(quick, quick + 24)) for _ in range(batch)]
        times: list[float] = []
        for _ in range(steps):
            checking = mode.startswith("check")
            remaining = budgets if checking else [10**6] * batch
            t0 = time.perf_counter()
            rows = GrammarRows(states, remaining)
            if mode == "masks":
                fill_bitmask(states, bitmask)
            else:
                rows.fill(bitmask)
            t1 = time.perf_counter()
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
            picked = torch.tensor([int(rng.choice(np.flatnonzero(bits[i]))) for i in range(batch)])
            t2 = time.perf_counter()
            if checking:
                rows.check(picked, list(range(batch)))  # the model's (random) token, or the plan's
            times.append(t1 - t0 + time.perf_counter() - t2)
            for i in range(batch):
                token = int(picked[i])
                done = token == tok.eos_token_id or states[i].advance(token)
                budgets[i] -= 1
                if done or budgets[i] <= 0:
                    states[i], budgets[i] = compiler.compile(constraint), int(rng.integers(quick, quick + 24))
        out[f"{mode}_us"] = statistics.median(times) * 1e6
        out[f"{mode}_mean_us"] = statistics.fmean(times) * 1e6  # replans are rare and slow: the mean shows them
        out[f"{mode}_p99_us"] = float(np.percentile(times, 99)) * 1e6
    budget_module.CHECK_SEARCH_POPS = check_pops
    out["check_search_pops"] = check_pops
    out["free_over_masks"] = out["free_us"] / out["masks_us"]
    out["check_over_masks"] = out["check_us"] / out["masks_us"]
    out["check_full_search_over_masks"] = out["check_full_search_us"] / out["masks_us"]
    return out


def _tool_prompt(engine: LocalEngine, tools: ToolCallConstraint, question: str) -> str:
    messages = prompt_messages([{"role": "user", "content": question}], None, StructuredRequest(tools, tools))
    return engine.render_chat(messages)


def validity(engine: LocalEngine, label: str, num_prompts: int, max_tokens: int | None) -> list[dict[str, Any]]:
    """Share of outputs that parse and validate, per kind (greedy and sampled at temperature 0.8).
    max_tokens None: each kind's shortest complete output + 8 tokens (a budget that closing must meet)."""
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
        num_valid = num_length = num_valid_length = 0
        total = 0
        budget = max_tokens
        if budget is None:
            assert engine._grammar is not None
            budget = (engine._grammar.compile(constraint).shortest_len() or 0) + 8
        for temperature in (0.0, 0.8):
            params = SamplingParams(max_tokens=budget, temperature=temperature, seed=7, constraint=constraint)
            for out in engine.generate(prompts, params):
                valid = _is_valid(out.text, kind, schema, by_name)
                total += 1
                num_valid += valid
                num_length += out.finish_reason == "length"  # the budget ended it (closed, or cut off)
                num_valid_length += valid and out.finish_reason == "length"
        finished = total - num_length
        rows.append({"model": label, "kind": kind, "max_tokens": budget, "outputs": total, "valid": num_valid,
                     "validity": num_valid / total, "hit_max_tokens": num_length,
                     "valid_at_max_tokens": num_valid_length,
                     "validity_of_finished": ((num_valid - num_valid_length) / finished) if finished else None})
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


PARTS = ("mask", "closing", "decode", "validity")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="ref-128k", choices=sorted(SHAPES), help="random-weight shape for the 128K rows")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--mask-steps", type=int, default=200)
    ap.add_argument("--num-new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--validity-prompts", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        ap.error(f"--parts {args.parts!r}: choose among {','.join(PARTS)}")
    if "validity" in parts and args.validity_prompts < 1:
        ap.error(f"--validity-prompts {args.validity_prompts}: give at least 1, or leave validity out of --parts")
    device = torch.device(args.device)
    t0 = time.perf_counter()
    toks: dict[str, tuple[PreTrainedTokenizerBase, int]] = {"reference-4k": (load_tokenizer(reference_model_path()), 4096),
            "bpe-128k": (bpe_128k(), int(SHAPES[args.shape]["vocab_size"]))}
    results: dict[str, Any] = {
        "command": "PYTHONPATH=. python bench/structured.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "hardware": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "llguidance": __import__("llguidance").__version__,
        "bpe_128k_build_s": time.perf_counter() - t0, "mask_cost": [], "closing_cost": [], "decode": [], "validity": [],
    }
    batches = [int(b) for b in args.batches.split(",")]
    out = Path(args.out)
    for name, (tok, vocab) in toks.items():
        for batch in batches:
            if "mask" in parts:
                _record(results["mask_cost"], {"tokenizer": name, **mask_cost(tok, vocab, batch, args.mask_steps, device)})
            if "closing" in parts:
                _record(results["closing_cost"], {"tokenizer": name, **closing_cost(tok, vocab, batch, args.mask_steps)})
        _save(results, out)
    if "decode" in parts:
        for label, engine in _decode_engines(args, toks, device, max(batches)):
            for batch in batches:
                _record(results["decode"], {"engine": label, **decode_speed(engine, batch, args.num_new, args.repeats)})
                _save(results, out)
            engine.close()
    if "validity" in parts:
        for label, engine in _validity_engines(device):
            for budget in (256, None):
                for row in validity(engine, label, args.validity_prompts, max_tokens=budget):
                    _record(results["validity"], row)
            engine.close()
            _save(results, out)


def _record(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)
    rows.append(row)


def _save(results: dict[str, Any], out: Path) -> None:
    """Write the results so far (atomically: a run stopped midway leaves every finished part)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)


def _decode_engines(
    args: argparse.Namespace, toks: dict[str, tuple[PreTrainedTokenizerBase, int]], device: torch.device, max_seqs: int
) -> Iterator[tuple[str, LocalEngine]]:
    """The reference model (CPU only) and random-weight engines of `args.shape` with each tokenizer (CPU:
    the 128K one only), built one at a time (the caller closes each before the next is built)."""
    if device.type == "cpu":
        yield "reference", LocalEngine.from_spec(str(reference_model_path()), device="cpu", dtype="float32",
                                                 num_kv_blocks=max_seqs * 8 + 64, max_model_len=1024)
    big_tok = toks["bpe-128k"][0]
    shape_cfg = ModelConfig(
        architecture="LlamaForCausalLM", rms_norm_eps=1e-5, rope_scaling=None, max_position_embeddings=1024,
        attention_bias=False, qk_norm=False, mlp_bias=False, tie_word_embeddings=False, sliding_window=None,
        bos_token_id=None, eos_token_ids=(int(big_tok.eos_token_id),), **SHAPES[args.shape],
    )
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = EngineConfig(device=device.type, dtype=dtype, max_model_len=1024, max_num_seqs=max_seqs,  # type: ignore[arg-type]
                       num_kv_blocks=max_seqs * 8 + 64)
    for tok_name in ("bpe-128k", "reference-4k"):
        yield f"random {args.shape} + {tok_name}", LocalEngine.from_random(shape_cfg, cfg, tokenizer=toks[tok_name][0])
        if device.type == "cpu":
            break  # on CPU the 128K row is the one that differs from the reference model


def _validity_engines(device: torch.device) -> Iterator[tuple[str, LocalEngine]]:
    """The reference model and four tiny random models (two of them loop inside JSON-mode strings), built
    one at a time (the caller closes each before the next is built)."""
    from tests.tiny_models import build_tiny_model

    yield "reference", LocalEngine.from_spec(str(reference_model_path()), device=device.type, num_kv_blocks=512,
                                             max_model_len=2048)
    for arch, seed in (("llama", 0), ("llama", 1), ("qwen2", 2), ("mistral", 3)):
        with tempfile.TemporaryDirectory(prefix="terse-bench-") as tmp:
            path = build_tiny_model(Path(tmp), arch, seed=seed)
            engine = LocalEngine.from_spec(str(path), device=device.type, num_kv_blocks=512, max_model_len=2048)
        yield f"tiny random {arch} seed {seed}", engine


if __name__ == "__main__":
    main()
