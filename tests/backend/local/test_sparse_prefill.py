"""Sparse prefill inside the local engine (torch kernel path on CPU, low threshold): full-budget patterns
reproduce dense greedy output, with and without prefix-cache hits; a real sparse pattern runs end to end
and writes the same layer-0 KV as dense prefill."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from terse.backend.local.config import EngineConfig, SparsePrefillSettings
from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams
from terse.errors import ConfigError
from terse.kernels.patterns import (
    AShapePattern,
    BlockSparsePattern,
    DensePattern,
    ModelPatterns,
    VerticalSlashPattern,
    save_patterns,
)
from terse.kernels.prefill_config import SparsePrefillConfig

BS = 4
FULL = (
    DensePattern(),
    AShapePattern(num_sink_tokens=0, window_len=1 << 20),
    VerticalSlashPattern(num_vertical=1 << 20, num_slash=1 << 20, target_mass=1.0),
    BlockSparsePattern(num_blocks=1 << 20, target_mass=1.0),
)
TIGHT = (VerticalSlashPattern(num_vertical=4, num_slash=4, target_mass=0.5),) * 4


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


def patterns_file(tmp_path: Path, layer: tuple[Any, ...], num_layers: int = 2) -> str:
    path = tmp_path / "patterns.json"
    save_patterns(ModelPatterns("tiny", num_layers, len(layer), (layer,) * num_layers), path)
    return str(path)


def make_engine(path: Path, sparse: SparsePrefillSettings | None = None) -> LocalEngine:
    fields: dict[str, Any] = {"kv_block_size": BS, "max_model_len": 512, "max_num_batched_tokens": 256}
    if sparse is not None:
        fields["sparse_prefill"] = sparse
    return LocalEngine.from_spec(str(path), **fields)


def prompt_ids(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, 500, (length,), generator=gen).tolist()


GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def test_settings_validate_and_match_the_kernel_default(llama: Path, tmp_path: Path) -> None:
    assert SparsePrefillSettings().kernel == SparsePrefillConfig()  # the kernels' defaults, held, not copied
    with pytest.raises(ConfigError, match="min_sparse_q_len=0"):
        SparsePrefillSettings.from_table({"min_sparse_q_len": 0})
    wrong = patterns_file(tmp_path, FULL[:2])
    with pytest.raises(ConfigError, match="2 heads"):
        make_engine(llama, SparsePrefillSettings(enabled=True, patterns_path=wrong))


def test_settings_from_a_table_hold_the_kernel_config() -> None:
    flat = SparsePrefillSettings.from_table({"enabled": True, "min_sparse_q_len": 64, "backend": "torch"})
    nested = SparsePrefillSettings.from_table(
        {"enabled": True, "kernel": {"min_sparse_q_len": 64, "backend": "torch", "estimate": {"last_q_len": 32}}}
    )
    assert flat.kernel == SparsePrefillConfig(min_sparse_q_len=64, backend="torch")
    assert nested.kernel.min_sparse_q_len == 64 and nested.kernel.estimate.last_q_len == 32
    assert EngineConfig.from_options({"sparse_prefill": {"enabled": True, "block_size_q": 32}}).sparse_prefill.kernel.block_size_q == 32
    with pytest.raises(ConfigError, match="unknown sparse_prefill fields \\['min_q'\\]"):
        SparsePrefillSettings.from_table({"min_q": 1})
    with pytest.raises(ConfigError, match="block_size_q=48"):
        SparsePrefillSettings.from_table({"block_size_q": 48})


def test_full_budget_patterns_match_dense_greedy_with_prefix_hits(llama: Path, tmp_path: Path) -> None:
    shared = prompt_ids(0, 128)
    prompts = [shared + prompt_ids(1 + i, 100 + 7 * i) for i in range(3)] + [prompt_ids(9, 10)]
    settings = SparsePrefillSettings(
        enabled=True, patterns_path=patterns_file(tmp_path, FULL),
        kernel=SparsePrefillConfig(min_sparse_q_len=32, backend="torch"),
    )
    with make_engine(llama) as dense_eng:
        expected = [c.token_ids for c in dense_eng.generate(prompts, GREEDY)]
        dense_kv = [prompt_kv(dense_eng, p) for p in prompts[:3]]
    with make_engine(llama, settings) as eng:
        first = eng.generate(prompts[:1], GREEDY)  # publishes the shared prefix
        rest = eng.generate(prompts[1:], GREEDY)  # 128 cached tokens each: q_len < k_len in the kernels
        assert [c.token_ids for c in first + rest] == expected
        for p, kv in zip(prompts[:3], dense_kv):  # every layer: the attention outputs matched dense
            torch.testing.assert_close(prompt_kv(eng, p), kv, atol=1e-5, rtol=1e-5)
        assert all(c.usage.cached_prompt_tokens >= 128 for c in rest[:2])
        sparse = eng.runner.attention.sparse_prefill
        assert sparse is not None and sparse.num_sparse_spans == 3  # the 10-token prompt stays dense


def prompt_kv(eng: LocalEngine, ids: list[int]) -> torch.Tensor:
    """[L, 2, num_full_blocks, bs, KVH, D] cached KV of the prompt's full blocks."""
    assert eng.prefix_cache is not None
    blocks = eng.prefix_cache.match(ids[: len(ids) // BS * BS]).block_ids
    assert len(blocks) == len(ids) // BS
    return eng.pool.kv[:, :, blocks].clone()


def test_real_sparse_pattern_runs_and_writes_dense_layer0_kv(llama: Path, tmp_path: Path) -> None:
    prompt = prompt_ids(5, 160)
    settings = SparsePrefillSettings(
        enabled=True, patterns_path=patterns_file(tmp_path, TIGHT),
        kernel=SparsePrefillConfig(min_sparse_q_len=64, backend="torch"),
    )
    with make_engine(llama) as dense_eng:
        dense_eng.generate([prompt], GREEDY)
        dense_kv = prompt_kv(dense_eng, prompt)
    with make_engine(llama, settings) as eng:
        completion = eng.generate([prompt], GREEDY)[0]
        sparse_kv = prompt_kv(eng, prompt)
        sparse = eng.runner.attention.sparse_prefill
        assert sparse is not None and sparse.num_sparse_spans == 1
    assert len(completion.token_ids) == 12
    torch.testing.assert_close(sparse_kv[0], dense_kv[0], rtol=0, atol=0)  # same K/V writes
    # Layer 1's K/V come from layer 0's (sparse) attention output: they must move, else nothing was skipped.
    assert not torch.allclose(sparse_kv[1], dense_kv[1], atol=1e-4)
    assert torch.isfinite(sparse_kv).all()


def test_patterns_saved_in_the_model_directory_are_picked_up(
    tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    model_dir = Path(shutil.copytree(tiny_model_factory("llama"), tmp_path / "model"))
    saved = model_dir / "sparse_patterns.json"  # where `terse sparse-patterns MODEL` writes
    save_patterns(ModelPatterns("tiny", 2, 4, (TIGHT,) * 2), saved)
    with LocalEngine.from_spec(str(model_dir), kv_block_size=BS, sparse_prefill={"min_sparse_q_len": 64}) as off:
        assert off.runner.attention.sparse_prefill is None  # enabled stays False unless asked
    with LocalEngine.from_spec(str(model_dir), kv_block_size=BS, sparse_prefill=True) as eng:
        sparse = eng.runner.attention.sparse_prefill
        assert sparse is not None and sparse.patterns.layer(0) == TIGHT
        assert eng.config.sparse_prefill.patterns_path == str(saved)
    explicit = patterns_file(tmp_path, FULL)  # a file given by the user wins over the saved one
    with LocalEngine.from_spec(str(model_dir), sparse_prefill={"enabled": True, "patterns_path": explicit}) as eng:
        sparse = eng.runner.attention.sparse_prefill
        assert sparse is not None and sparse.patterns.layer(0) == FULL
    with pytest.raises(ConfigError, match=r"unknown sparse_prefill fields \['threshold'\]"):
        EngineConfig.from_options({"sparse_prefill": {"threshold": 3}})
