"""Model variants against transformers: RoPE scaling (llama3, linear), tied embeddings; loader errors;
a failing step fails only its own requests."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams
from terse.errors import BackendUnavailableError, ConfigError, ModelLoadError
from tests.backend.local.helpers import Reference

PROMPT = "Alice works at Acme Corp in Paris; Bob founded Globex in 1998. The quick brown fox jumps over the lazy dog."


def variant(src: Path, dst: Path, updates: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """Copy a model directory, update config.json, and drop weights from its safetensors."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(updates)
    (dst / "config.json").write_text(json.dumps(config))
    if drop:
        weights = load_file(str(dst / "model.safetensors"))
        save_file({k: v for k, v in weights.items() if k not in drop}, str(dst / "model.safetensors"))
    return dst


def assert_parity(path: Path) -> None:
    ref = Reference(path)
    with LocalEngine.from_spec(str(path), kv_block_size=4, max_num_batched_tokens=16) as engine:
        (out,) = engine.generate([PROMPT], SamplingParams(max_tokens=16, ignore_eos=True))
        (scores,) = engine.score([PROMPT])
    assert list(out.token_ids) == ref.greedy(PROMPT, 16, [])
    assert scores.logprobs == pytest.approx(ref.logprobs(ref.tokenizer(PROMPT).input_ids), abs=1e-4)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    ],
    ids=["llama3", "linear"],
)
def test_rope_scaling_matches_transformers(
    rope: dict[str, Any], tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    assert_parity(variant(tiny_model_factory("llama"), tmp_path / "m", {"rope_parameters": rope}))


def test_tied_embeddings_match_transformers(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    path = variant(tiny_model_factory("llama"), tmp_path / "m", {"tie_word_embeddings": True}, drop=("lm_head.weight",))
    assert_parity(path)


def test_loader_errors(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model_factory("llama")
    yarn = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}
    with pytest.raises(ModelLoadError, match=r"rope_type 'yarn' is not supported.*'hf:"):
        LocalEngine.from_spec(str(variant(src, tmp_path / "yarn", yarn)))
    with pytest.raises(ModelLoadError, match=r"lacks 1 weights .*lm_head.weight"):
        LocalEngine.from_spec(str(variant(src, tmp_path / "nohead", {}, drop=("lm_head.weight",))))
    with pytest.raises(ConfigError, match=r"unknown EngineConfig fields \['prefill_attention'\]"):
        LocalEngine.from_spec(str(src), prefill_attention="sparse")


def test_failed_step_fails_its_requests_only(tiny_model_factory: Callable[..., Path]) -> None:
    with LocalEngine.from_spec(str(tiny_model_factory("llama")), kv_block_size=4, enable_prefix_cache=False) as engine:
        real_launch = engine.runner.launch
        calls = {"n": 0}

        def flaky(plan: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated device fault")
            return real_launch(plan)

        engine.runner.launch = flaky  # type: ignore[method-assign]
        first = engine.submit("The quick brown fox", SamplingParams(max_tokens=4))
        with pytest.raises(RuntimeError, match="simulated device fault"):
            first.result(timeout=60)
        second = engine.submit("The quick brown fox", SamplingParams(max_tokens=4))
        assert second.result(timeout=60).usage.completion_tokens == 4
        assert engine.num_failed_steps == 1
        assert engine.allocator.num_free_blocks == engine.num_kv_blocks


def test_close_fails_unfinished_requests(tiny_model_factory: Callable[..., Path]) -> None:
    engine = LocalEngine.from_spec(str(tiny_model_factory("llama")), kv_block_size=4)
    handle = engine.submit("The quick brown fox", SamplingParams(max_tokens=1000, ignore_eos=True))
    engine.close()
    with pytest.raises(BackendUnavailableError, match="closed"):
        handle.result(timeout=60)
    with pytest.raises(BackendUnavailableError, match="closed"):
        engine.submit("again", SamplingParams())
    # the KV pool is freed at close, not whenever the garbage collector finds the engine
    assert engine.pool.kv.numel() == 0 and engine.runner.graphs is None


def test_max_tokens_zero_prefills_and_warms_the_cache(tiny_model_factory: Callable[..., Path]) -> None:
    with LocalEngine.from_spec(str(tiny_model_factory("llama")), kv_block_size=4) as engine:
        warm = engine.submit(PROMPT, SamplingParams(max_tokens=0)).result(timeout=60)
        assert (warm.text, warm.token_ids, warm.finish_reason) == ("", (), "length")
        assert warm.usage.completion_tokens == 0
        out = engine.submit(PROMPT + " And then", SamplingParams(max_tokens=2)).result(timeout=60)
        assert out.usage.cached_prompt_tokens >= (warm.usage.prompt_tokens - 1) // 4 * 4
