"""Where a batch-1 decode step of the INT4 engine spends its time, and the small kernels around the products
(one GPU, 8B shape, random weights).

    PYTHONPATH=. python bench/decode_profile.py --out $OUT/decode_profile.json
    PYTHONPATH=. python bench/decode_profile.py --table bench/results/decode_profile.json

- `paged`: paged-decode attention (the kernel and its split merge) at batch 1 and 32 over a 4096-token
  table (8 KV heads, 32 query heads, head dim 128, bf16), per split size (`min_tiles_per_split`) and
  loop pipelining (`num_stages`; None: the kernel's rule), against the torch reference; timed launch-free.
- `argmax`: greedy token ids over the 8B vocabulary, torch's reduction against `terse.kernels.argmax`.
- `launch`: the INT4 engine's decode graphs captured with programmatic dependent launch off, on, and on
  with the column GEMV's L2 prefetch at several sizes, and with the MLP's SiLU-and-multiply in the
  gate/up product's launch or in its own: one replay of the batch-1 and batch-32 graphs, batch-1 decode
  ms/token, and whether the batch-1 graph's output and 48 greedy tokens equal the first variant's (the
  arithmetic is the same in every variant; only launches differ).
- `epilogues`: the same measurements with the row prep (terse/kernels/row_prep.py: the norm and the
  gate/up store writing the next product's input side) and the RoPE + KV store in the q/k/v product's
  launch each on and off (the variants round differently, so outputs may differ in the last bits).
- `engine`: the INT4 engine (round-to-nearest, group 128, LM head quantized, CUDA graphs): batch-1 decode
  ms/token after a 128-token prompt, one replay of the batch-1 decode graph alone (the LM head included:
  the graphs capture it; results before that change exclude it), and each kernel's
  device time per decode step from the torch profiler (33 steps; the prompt's prefill is one of them).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

if TYPE_CHECKING:
    from terse.kernels.w4a16_gemv_column import LateLaunch

PAGED_CASES = ((1, 130), (1, 256), (1, 600), (1, 1500), (1, 4000), (32, 300), (32, 2000))
"""(batch, context tokens) of the paged-decode timings."""
PAGED_SETTINGS = ((2, 3), (1, None), (1, 3), (2, None), (4, None))
"""(min_tiles_per_split, num_stages): the settings before this benchmark's change first, then the default."""


def _us(fn: Any) -> float:
    from terse.kernels.w4a16_timing import graph_ms

    return graph_ms([fn], min_calls=24, replays=7) * 1e3


def paged_part() -> list[dict[str, Any]]:
    import torch

    from terse.kernels.decode_reference import paged_decode_reference
    from terse.kernels.paged_decode import paged_decode_triton

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    kv = torch.randn(2, 4096, 16, 8, 128, device=dev, generator=gen).to(bf16)
    rows = []
    for batch, ctx in PAGED_CASES:
        tables = torch.randint(1, 4096, (batch, 256), device=dev, generator=gen)
        lens = torch.full((batch,), ctx, device=dev)
        q = torch.randn(batch, 32, 128, device=dev, generator=gen).to(bf16)
        want = paged_decode_reference(q.float(), kv.float(), tables, lens)
        row: dict[str, Any] = {"batch": batch, "context": ctx}
        for min_tiles, stages in PAGED_SETTINGS:

            def call(q: Any = q, tables: Any = tables, lens: Any = lens, mt: int = min_tiles,
                     st: int | None = stages) -> Any:
                return paged_decode_triton(q, kv, tables, lens, min_tiles_per_split=mt, num_stages=st)

            err = float((call().float() - want).norm() / want.norm())
            row[f"min_tiles={min_tiles} stages={stages}"] = {"us": _us(call), "rel_err": err}
        rows.append(row)
        print(f"[decode_profile] paged {row}", flush=True)
    return rows


def argmax_part() -> list[dict[str, Any]]:
    import torch

    from terse.kernels.argmax import argmax_rows

    rows = []
    for batch in (1, 32):
        for dtype in (torch.bfloat16, torch.float32):
            logits = torch.randn(batch, 128256, device="cuda").to(dtype)
            row = {"batch": batch, "dtype": str(dtype), "torch_us": _us(lambda x=logits: x.argmax(dim=-1)),
                   "triton_us": _us(lambda x=logits: argmax_rows(x)),
                   "equal": bool(torch.equal(argmax_rows(logits), logits.argmax(dim=-1)))}
            rows.append(row)
            print(f"[decode_profile] argmax {row}", flush=True)
    return rows


LAUNCH_VARIANTS: tuple[tuple[str, bool, int, bool, LateLaunch], ...] = (("off, activation apart", False, 0, False, "none"), ("off", False, 0, True, "none"),
                   ("dependent + 4 MB prefetch, activation apart", True, 4 << 20, False, "none"),
                   ("dependent + 4 MB prefetch, activation apart, late launch", True, 4 << 20, False, "all"),
                   ("dependent + 4 MB prefetch, early launch", True, 4 << 20, True, "none"),
                   ("dependent + 4 MB prefetch, late launch", True, 4 << 20, True, "all"),
                   ("dependent + 4 MB prefetch", True, 4 << 20, True, "silu_mul"),
                   ("dependent + 1 MB prefetch", True, 1 << 20, True, "silu_mul"),
                   ("dependent + 2 MB prefetch", True, 2 << 20, True, "silu_mul"),
                   ("dependent + 8 MB prefetch", True, 8 << 20, True, "silu_mul"))
"""(name, programmatic dependent launch, column GEMV prefetch bytes, SiLU-and-multiply in the gate/up
product's launch, which column GEMVs let the next kernel launch only after their loop) of the `launch` part."""

EPILOGUE_VARIANTS = (("row prep + fused RoPE store (default)", True, True), ("no row prep", False, True),
                     ("no fused RoPE store", True, False), ("neither", False, False))
"""(name, row prep, RoPE + KV store in the q/k/v product's launch) of the `epilogues` part."""


def _int4_engine(max_num_seqs: int) -> Any:
    from engine import model_config

    from terse.backend.local.config import EngineConfig
    from terse.backend.local.engine import LocalEngine
    from terse.backend.local.quant.config import QuantizationConfig

    config = model_config("8b", max_len=4096)
    return LocalEngine.from_random(config, EngineConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=8192, max_model_len=4096, num_kv_blocks=4096,
        enable_prefix_cache=False, quantization=QuantizationConfig(awq=False, lm_head=True)))


def _median_replay_ms(graph: Any, replays: int) -> float:
    """Median of 5 timings of `replays` back-to-back replays of a captured graph (ms per replay)."""
    from terse.backend.local.cuda_graph import replay_ms

    return sorted(replay_ms(graph, replays) for _ in range(5))[2]


def _graph_variants(variants: list[tuple[str, Callable[[], None]]]) -> list[dict[str, Any]]:
    """Per variant (name, a function that sets it up), one INT4 engine's decode graphs recaptured: one replay
    of the batch-1 and batch-32 graphs, batch-1 decode ms/token, and whether the batch-1 graph's output and
    48 greedy tokens equal the first variant's."""
    import gc

    import numpy as np
    import torch

    from terse.backend.types import SamplingParams

    engine = _int4_engine(32)
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, 128).tolist()

    def decode_ms(batch: int, new: int) -> float:
        prompts = [rng.integers(0, vocab, 128).tolist() for _ in range(batch)]
        outs = engine.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
        return float((max(o.metrics["latency"] for o in outs) - max(o.metrics["ttft"] for o in outs)) / (new - 1) * 1e3)

    def batch1_output() -> Any:
        # one token at position 0 whose K/V go to the scratch block: the same input for every variant
        graphs = engine.runner.graphs
        graphs.pad(1).input_ids.fill_(7)
        graphs.graphs[1].replay()
        return graphs.outputs[1].hidden.clone()

    decode_ms(1, 8)
    decode_ms(32, 8)  # plans measured for both graph sizes
    rows: list[dict[str, Any]] = []
    baseline: dict[str, Any] = {}
    try:
        for name, set_up in variants:
            set_up()
            engine.runner.graphs = None
            gc.collect()
            engine.runner.capture_cuda_graphs(32)
            output = batch1_output()
            decode_ms(1, 8)
            tokens = engine.generate([prompt], SamplingParams(max_tokens=48, ignore_eos=True))[0].token_ids
            baseline = baseline or {"output": output, "tokens": tokens}
            # each graph replays on the inputs a step of its size left in the static buffer (the sizes share
            # it: a graph replayed after a step of another size would read that step's layout as its own)
            graph_ms_batch1 = _median_replay_ms(engine.runner.graphs.graphs[1], 100)
            decode_ms(32, 8)
            graph_ms_batch32 = _median_replay_ms(engine.runner.graphs.graphs[32], 30)
            rows.append({
                "variant": name, "graph_ms_batch1": graph_ms_batch1, "graph_ms_batch32": graph_ms_batch32,
                "decode_ms_batch1": [decode_ms(1, 96) for _ in range(2)],
                "output_equal": bool(torch.equal(output, baseline["output"])),
                "tokens_equal": list(tokens) == list(baseline["tokens"]),
            })
            print(f"[decode_profile] {rows[-1]}", flush=True)
    finally:
        engine.close()
    return rows


def launch_part() -> list[dict[str, Any]]:
    from terse.backend.local.quant.modules import Int4Linear
    from terse.kernels import dependent_launch, w4a16_gemv_column

    fused_activation = Int4Linear.silu_mul_forward
    default_prefetch, default_late = w4a16_gemv_column.PREFETCH_BYTES, w4a16_gemv_column.LATE_LAUNCH

    def variant(dependent: bool, prefetch: int, fused: bool, late: LateLaunch) -> Callable[[], None]:
        def set_up() -> None:
            dependent_launch.set_dependent_launch(dependent)
            w4a16_gemv_column.PREFETCH_BYTES = prefetch
            w4a16_gemv_column.LATE_LAUNCH = late
            Int4Linear.silu_mul_forward = fused_activation if fused else lambda self, x, *rest: None  # type: ignore[method-assign]
        return set_up

    try:
        return _graph_variants([(name, variant(*flags)) for name, *flags in LAUNCH_VARIANTS])
    finally:
        dependent_launch.set_dependent_launch(True)
        w4a16_gemv_column.PREFETCH_BYTES, w4a16_gemv_column.LATE_LAUNCH = default_prefetch, default_late
        Int4Linear.silu_mul_forward = fused_activation  # type: ignore[method-assign]


def epilogues_part() -> list[dict[str, Any]]:
    """The row prep (terse/kernels/row_prep.py) and the q/k/v product's RoPE + KV store, each on and off."""
    from terse.backend.local.models.ops import TritonOps
    from terse.kernels import w4a16

    min_columns, rope_store = w4a16.ROW_PREP_MIN_COLUMNS_PER_WARP, TritonOps.project_rope_store

    def variant(prep: bool, rope: bool) -> Callable[[], None]:
        def set_up() -> None:
            w4a16.ROW_PREP_MIN_COLUMNS_PER_WARP = min_columns if prep else 1 << 30
            TritonOps.project_rope_store = rope_store if rope else lambda self, *args: None  # type: ignore[method-assign]
        return set_up

    try:
        return _graph_variants([(name, variant(*flags)) for name, *flags in EPILOGUE_VARIANTS])
    finally:
        w4a16.ROW_PREP_MIN_COLUMNS_PER_WARP, TritonOps.project_rope_store = min_columns, rope_store  # type: ignore[method-assign]


def engine_part() -> dict[str, Any]:
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from terse.backend.local.cuda_graph import replay_ms
    from terse.backend.types import SamplingParams

    engine = _int4_engine(8)
    config = engine.model_config
    rng = np.random.default_rng(0)

    def generate(new: int) -> Any:
        prompt = rng.integers(0, config.vocab_size, 128).tolist()
        return engine.generate([prompt], SamplingParams(max_tokens=new, ignore_eos=True))[0]

    def decode_ms(new: int) -> float:
        out = generate(new)
        return float((out.metrics["latency"] - out.metrics["ttft"]) / (new - 1) * 1e3)

    for _ in range(2):
        decode_ms(8)  # plans measured, graphs warm
    result: dict[str, Any] = {"decode_ms_batch1": [decode_ms(128) for _ in range(3)]}
    result["graph_replay_ms_batch1"] = replay_ms(engine.runner.graphs.graphs[1], 50)
    steps = 33
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(steps)
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name[:90]]
            entry[0] += 1
            entry[1] += event.device_time
    result["kernels_per_step"] = sorted(
        ({"kernel": name, "us_per_step": total / steps, "launches_per_step": count / steps}
         for name, (count, total) in per_kernel.items()), key=lambda r: -r["us_per_step"])
    engine.close()
    print(f"[decode_profile] engine {result['decode_ms_batch1']} ms/token, graph {result['graph_replay_ms_batch1']:.3f} ms",
          flush=True)
    return result


def table(result: dict[str, Any]) -> str:
    lines = []
    if "paged" in result:
        names = [k for k in result["paged"][0] if k not in ("batch", "context")]
        lines += ["| batch | context | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for row in result["paged"]:
            lines.append(f"| {row['batch']} | {row['context']} | " + " | ".join(f"{row[n]['us']:.2f}" for n in names) + " |")
        lines.append("")
    for row in result.get("argmax", []):
        lines.append(f"argmax batch {row['batch']} {row['dtype']}: torch {row['torch_us']:.2f} us, triton "
                     f"{row['triton_us']:.2f} us, equal {row['equal']}")
    for part in ("launch", "epilogues"):
        if part not in result:
            continue
        lines += ["", f"| {part} | graph ms, batch 1 | graph ms, batch 32 | decode ms/token, batch 1 | output equal | tokens equal |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['graph_ms_batch1']:.3f} | {r['graph_ms_batch32']:.3f} | "
                  f"{', '.join(f'{v:.3f}' for v in r['decode_ms_batch1'])} | {r['output_equal']} | {r['tokens_equal']} |"
                  for r in result[part]]
    if "engine" in result:
        e = result["engine"]
        lines += ["", f"decode ms/token (batch 1): {', '.join(f'{v:.3f}' for v in e['decode_ms_batch1'])}; graph replay "
                  f"{e['graph_replay_ms_batch1']:.3f} ms", "", "| kernel | us per step | launches per step |", "|---|---|---|"]
        lines += [f"| `{r['kernel'][:60]}` | {r['us_per_step']:.1f} | {r['launches_per_step']:.2f} |"
                  for r in e["kernels_per_step"][:16]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="paged,argmax,launch,engine")
    parser.add_argument("--out", default="")
    parser.add_argument("--table", type=Path, help="print the tables of a saved result and exit")
    args = parser.parse_args(argv)
    parts = {"paged": paged_part, "argmax": argmax_part, "launch": launch_part, "epilogues": epilogues_part,
             "engine": engine_part}
    unknown = [name for name in args.parts.split(",") if name not in parts]
    if unknown:
        print(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(parts)}", file=sys.stderr)
        return 2
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    import torch
    import triton

    if not torch.cuda.is_available():
        print("decode_profile needs a CUDA GPU", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "versions": {
        "torch": torch.__version__, "triton": triton.__version__}}
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        result[name] = parts[name]()
        print(f"[decode_profile] {name} took {time.perf_counter() - t0:.0f} s", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
