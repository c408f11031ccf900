"""Decode CUDA graphs against eager decoding, on a GPU: one line per check, exit status 1 if any fails.

- `tokens`: a tiny random Llama model in float32, greedy; the engine with CUDA graphs against the same
  engine with graphs off (eager decode steps), token for token. Batch 1, and batch 5 with requests of
  different lengths, so that the batch shrinks through the graphs of sizes 8, 4, 2 and 1 (they share one
  static input buffer); each once plainly and once with speculative decoding (prompt lookup on
  repetitive prompts: verified drafts, carried positions, guessed drafts); the graph engine twice, its
  steps' inputs sent at the full table width in one copy and (forced) at the batch's width, then spread.
- `head`: per captured size, the graph's logits equal the eager LM head on the graph's hidden rows,
  bit for bit, in float32 and bfloat16 (the runner takes them for steps whose every row samples).

Tokens are compared in float32 only: in bfloat16 an eager step may round differently from a replay
for reasons older than the graphs' logits (the decode attention splits the context by the table width,
the batch's in an eager step, max_blocks_per_seq in a graph). Nothing is timed.

    PYTHONPATH=. python bench/graph_inputs_check.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from engine_check import tiny_model

from terse.backend.local import runner as runner_module
from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams

LENGTHS = [24, 5, 11, 2, 17]
"""New tokens per request of the batch-5 runs (the batch shrinks as the shorter ones finish)."""

SPECULATIVE = {"num_draft_tokens": 3, "min_acceptance": 0.0, "draft_ahead": True}
"""Every lookup match is verified; drafts are built on guesses of the token in flight."""


def _engine(path: Path, dtype: str, graphs: bool, speculative: dict[str, Any] | None) -> LocalEngine:
    return LocalEngine.from_spec(
        str(path), dtype=dtype, device="cuda", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=512,
        enable_cuda_graphs=graphs, speculative=speculative,
    )


def _generate(engine: LocalEngine, prompts: list[str], lengths: list[int]) -> list[list[int]]:
    handles = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    return [list(h.result().token_ids) for h in handles]


def _report(name: str, ok: bool, detail: str) -> bool:
    print(f"[graph_inputs_check] {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def check_tokens(path: Path, prompts: list[str]) -> bool:
    repetitive = [" ".join([p] * 4) for p in prompts]  # prompt lookup finds drafts in repeated text
    runs = {
        "batch1": ([prompts[0]], [32]),
        "batch5": (prompts[:5], LENGTHS),
        "batch1_speculative": ([repetitive[0]], [32]),
        "batch5_speculative": (repetitive[:5], LENGTHS),
    }
    ok = True
    full_width = runner_module.FULL_WIDTH_COPY_BYTES
    for spec in (None, SPECULATIVE):
        outputs: dict[str, dict[str, list[list[int]]]] = {}
        num_drafted: dict[str, int] = {}  # per run of the graph engines
        # "spread": graph steps' inputs sent at the batch's table width and spread on the device (the path
        # of long max_model_len), forced here by a zero threshold
        for mode in ("graphs", "spread", "eager"):
            runner_module.FULL_WIDTH_COPY_BYTES = 0 if mode == "spread" else full_width
            graphs = mode != "eager"
            engine = _engine(path, "float32", graphs, spec)
            assert (engine.runner.graphs is not None) is graphs, "graphs on: the engine must have captured them"
            outputs[mode] = {}
            for name, run in runs.items():
                if name.endswith("_speculative") is (spec is not None):
                    before = engine.speculator.num_draft_tokens if engine.speculator is not None else 0
                    outputs[mode][name] = _generate(engine, *run)
                    after = engine.speculator.num_draft_tokens if engine.speculator is not None else 0
                    if graphs:
                        num_drafted[name] = after - before
            engine.close()
        runner_module.FULL_WIDTH_COPY_BYTES = full_width
        for mode in ("graphs", "spread"):
            for name, graph_tokens in outputs[mode].items():
                eager_tokens = outputs["eager"][name]
                same = sum(g == e for g, e in zip(graph_tokens, eager_tokens))
                drafted = f", {num_drafted[name]} draft tokens verified" if spec is not None else ""
                ok &= _report(f"tokens float32 {name} ({mode})",
                              same == len(eager_tokens) and (spec is None or num_drafted[name] > 0),
                              f"{same}/{len(eager_tokens)} sequences identical (graphs vs eager){drafted}")
    return ok


@torch.inference_mode()
def check_head(path: Path, dtype: str) -> bool:
    engine = _engine(path, dtype, True, None)
    graphs, model = engine.runner.graphs, engine.runner.model
    assert graphs is not None
    gen = torch.Generator(device="cuda").manual_seed(0)
    equal = []
    for size in graphs.sizes:  # padding rows only: the replays write the scratch block, no real one
        inputs = graphs.pad(size)
        inputs.input_ids.copy_(torch.randint(0, engine.model_config.vocab_size, (size,), device="cuda", generator=gen))
        out = graphs.run(size)
        equal.append(torch.equal(out.logits, model.logits(out.hidden)))
    engine.close()
    failed = [s for s, e in zip(graphs.sizes, equal) if not e]
    return _report(f"head {dtype}", not failed, f"graph logits == eager LM head at sizes {graphs.sizes}"
                   + (f"; differ at {failed}" if failed else ""))


def main() -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        print("[graph_inputs_check] needs a CUDA GPU", file=sys.stderr)
        return 2
    path, prompts = tiny_model("llama", 5)
    ok = check_tokens(path, prompts)
    for dtype in ("float32", "bfloat16"):
        ok &= check_head(path, dtype)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
