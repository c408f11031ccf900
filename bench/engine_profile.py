"""Where a decode step's time goes on the GPU: a torch profiler window over steady decode steps of one
batch (prefill excluded), GPU busy time per step from the kernel timeline, and the top kernels."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams


def profile_decode(engine: LocalEngine, batch_size: int, prompt_len: int, out_dir: Path, num_steps: int = 30) -> dict[str, Any]:
    """Profile `num_steps` decode steps of `batch_size` sequences of ~`prompt_len` + a few tokens."""
    from torch.profiler import ProfilerActivity, profile

    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, engine.model_config.vocab_size, prompt_len).tolist() for _ in range(batch_size)]
    # long enough to outlast the profiler's start; cancelled once the window is over
    params = SamplingParams(max_tokens=min(2000, engine.max_model_len - prompt_len - 1), ignore_eos=True)
    start = engine.stats["num_decode_tokens"]
    handles = [engine.submit(p, params) for p in prompts]
    deadline = time.perf_counter() + 60
    while engine.stats["num_decode_tokens"] < start + 5 * batch_size and time.perf_counter() < deadline:
        time.sleep(0.0005)  # prefill done, decode under way
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        first = engine.stats["num_decode_tokens"]
        t0 = time.perf_counter()
        while engine.stats["num_decode_tokens"] < first + num_steps * batch_size and time.perf_counter() < deadline:
            time.sleep(0.0002)
        wall = time.perf_counter() - t0
        steps = max(1, (engine.stats["num_decode_tokens"] - first) // batch_size)
    for h in handles:
        h.cancel()
    for h in handles:
        h.result()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (out_dir / f"profile_bs{batch_size}.txt").write_text(table)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy_us = sum(end - begin for begin, end in spans)
    span_us = (spans[-1][1] - spans[0][0]) if spans else 0.0
    return {"batch_size": batch_size, "steps": steps, "wall_ms_per_step": wall / steps * 1e3,
            "gpu_span_ms_per_step": span_us / steps / 1e3, "gpu_busy_ms_per_step": busy_us / steps / 1e3,
            "num_kernels_per_step": len(kernels) / steps}
