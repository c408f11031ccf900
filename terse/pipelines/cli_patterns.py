"""`terse sparse-patterns`: search per-head sparse prefill patterns for a model on a sample prompt.

    terse sparse-patterns path/to/model --prompt-file long.txt --length 32768
    -> path/to/model/sparse_patterns.json (or --out), read by the local engine through
       terse.kernels.patterns.load_or_default; the search itself is `terse.pipelines.pattern_search`

The prompt file is tokenized with the model's tokenizer and repeated or cut to --length tokens; search
on prompts as long as those you will serve (budgets are counts). Runs on the GPU when there is one.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--prompt-file", type=Path, required=True, help="sample text, repeated to --length tokens")
    parser.add_argument("--length", type=int, default=8192, help="sample prompt tokens (default 8192)")
    parser.add_argument("--out", type=Path, default=None, help="patterns JSON (default MODEL/sparse_patterns.json)")
    parser.add_argument("--target-mass", type=float, default=0.95, help="attention mass each head must keep")
    parser.add_argument("--rows", type=int, default=256, help="query rows that measure recall (default 256)")
    parser.add_argument("--block-size", type=int, default=64, help="prefill tile size (default 64)")


def _sample_ids(tokenizer: object, text: str, length: int) -> list[int]:
    from terse.errors import ConfigError

    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if not ids:
        raise ConfigError("the prompt file has no tokens; pass a file with text in it")
    if length < 2:
        raise ConfigError(f"--length {length}; the sample prompt needs at least 2 tokens")
    return (ids * (length // len(ids) + 1))[:length]


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from terse.errors import ConfigError
    from terse.kernels.patterns import save_patterns
    from terse.pipelines.pattern_search.capture import search_transformers_model
    from terse.pipelines.pattern_search.search import SearchConfig

    if not args.prompt_file.is_file():
        raise ConfigError(f"--prompt-file {str(args.prompt_file)!r} does not exist")
    config = SearchConfig(target_mass=args.target_mass, num_sample_rows=args.rows,
                          block_size_q=args.block_size, block_size_k=args.block_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model: Any = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto", attn_implementation="sdpa")
    model.to(device)
    ids = _sample_ids(tokenizer, args.prompt_file.read_text(encoding="utf-8"), args.length)
    input_ids = torch.tensor([ids], device=device)
    patterns, scores = search_transformers_model(model, input_ids, str(args.model), config)
    out = args.out or args.model / "sparse_patterns.json"
    save_patterns(patterns, out)
    kinds = Counter(s.pattern.kind for layer in scores for s in layer)
    heads = sum(kinds.values())
    mean_cost = sum(s.cost for layer in scores for s in layer) / heads
    print(f"{out}: {heads} heads, " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
          + f"; mean computed tiles {mean_cost:.1%} of dense at {args.length} tokens")
    return 0
