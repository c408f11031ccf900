"""Correctness anchor of the quantized engine: greedy output equals transformers' `generate` token for
token, and `score()` its log-probabilities, in float32, with transformers running the dequantized
weights (what the INT4 model computes, written out as a dense checkpoint)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from terse.backend.local.engine import LocalEngine
from terse.backend.local.quant.checkpoint import save_dequantized
from terse.backend.types import SamplingParams
from tests.backend.local.helpers import Reference, mixed_prompts

MAX_NEW = 10
CASES = {
    "llama-awq-asym-g32": ("llama", {"group_size": 32, "calibration_tokens": 256}),
    "llama-rtn-sym-g64-head-embed": ("llama", {"group_size": 64, "scheme": "sym", "awq": False, "lm_head": True,
                                               "embeddings": True}),
    "qwen2-awq-sym-g32-bias": ("qwen2", {"group_size": 32, "scheme": "sym", "calibration_tokens": 256}),
    "qwen3-awq-asym-g128-head": ("qwen3", {"group_size": 128, "lm_head": True, "calibration_tokens": 256}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(
    request: pytest.FixtureRequest, tiny_model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalEngine, Reference]]:
    arch, quantization = CASES[request.param]
    path = tiny_model_factory(arch)
    engine = LocalEngine.from_spec(str(path), kv_block_size=4, max_num_batched_tokens=24, num_kv_blocks=256,
                                   quantization=quantization)
    dense = save_dequantized(engine.runner.model, path, tmp_path_factory.mktemp(f"deq-{request.param}"))
    yield engine, Reference(dense)
    engine.close()


def test_greedy_matches_transformers_on_dequantized_weights(pair: tuple[LocalEngine, Reference]) -> None:
    engine, ref = pair
    prompts = mixed_prompts(8, seed=4)
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW))
    eos = sorted(engine.eos_token_ids)
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == ref.greedy(prompt, MAX_NEW, eos), prompt


def test_score_matches_transformers_on_dequantized_weights(pair: tuple[LocalEngine, Reference]) -> None:
    engine, ref = pair
    text = "Alice works at Acme Corp in Paris; Bob founded Globex in 1998."
    (got,) = engine.score([text], prefix="Question:")
    prefix_ids = ref.tokenizer("Question:").input_ids
    expected = ref.logprobs(prefix_ids + list(got.token_ids))[len(prefix_ids) - 1 :]
    assert got.logprobs == pytest.approx(expected, abs=1e-4)


def test_the_model_really_is_quantized(pair: tuple[LocalEngine, Reference]) -> None:
    from terse.backend.local.quant.modules import Int4Linear

    engine, _ = pair
    model = engine.runner.model
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) >= 4 * model.config.num_layers  # qkv, o, gate_up, down per layer
