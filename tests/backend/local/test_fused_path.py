"""The engine with its CUDA kernels swapped in (Triton's CPU interpreter): the fused per-layer ops and
the Triton paged decode produce the torch path's greedy tokens and prompt scores, through chunked
prefill, prefix-cache hits and decode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from terse.backend.local.engine import LocalEngine
from terse.backend.local.models.ops import TritonOps
from terse.backend.types import SamplingParams
from terse.kernels.paged_decode import paged_decode_triton
from tests.backend.local.helpers import mixed_prompts


def test_fused_kernels_match_the_torch_path(tiny_model_factory: Callable[..., Path]) -> None:
    path = str(tiny_model_factory("llama"))
    prompts = mixed_prompts(3, seed=11, max_words=30)
    prompts.append(prompts[0] + " and more")  # a prefix-cache hit
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    fields = {"kv_block_size": 16, "max_model_len": 256, "max_num_batched_tokens": 48, "num_kv_blocks": 64}
    with LocalEngine.from_spec(path, **fields) as torch_engine:
        expected = [c.token_ids for c in torch_engine.generate(prompts, params)]
        expected_scores = torch_engine.score(prompts[:1], prefix="Q:")
    with LocalEngine.from_spec(path, **fields) as engine:
        engine.runner.model.ops = TritonOps()
        engine.runner.attention.decode = paged_decode_triton
        got = [c.token_ids for c in engine.generate(prompts, params)]
        scores = engine.score(prompts[:1], prefix="Q:")
        assert engine.stats["num_cached_tokens"] > 0
    assert got == expected
    for a, b in zip(scores, expected_scores):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
