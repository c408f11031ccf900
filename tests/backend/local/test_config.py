"""Engine options from plain data and the command line: sizes, sparse prefill, clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from terse.backend.local.config import EngineConfig, SparsePrefillSettings, parse_memory
from terse.errors import ConfigError
from terse.pipelines import cli_serve


def test_memory_sizes_parse_to_fractions_or_bytes() -> None:
    assert parse_memory("0.3") == 0.3
    assert parse_memory("8GiB") == 8 << 30 and parse_memory("512 MiB") == 512 << 20
    assert parse_memory("2GB") == 2_000_000_000 and parse_memory("1048576") == 1 << 20
    for bad in ("lots", "8 parsecs", "1.5", "-1GiB"):
        with pytest.raises(ConfigError, match="kv_cache_memory"):
            parse_memory(bad)


def test_options_build_nested_settings() -> None:
    config = EngineConfig.from_options({"kv_cache_memory": "1GiB", "sparse_prefill": True})
    assert config.kv_cache_memory == 1 << 30 and config.sparse_prefill == SparsePrefillSettings(enabled=True)
    config = EngineConfig.from_options({"default_streaming_kv": {"sink_tokens": 4, "window_tokens": 64}})
    assert config.default_streaming_kv is not None and config.default_streaming_kv.window_tokens == 64
    with pytest.raises(ConfigError, match=r"patterns_path='nowhere.json' is not a file.*terse sparse-patterns"):
        SparsePrefillSettings(enabled=True, patterns_path="nowhere.json")


def serve_args(*argv: str, model: str = "local:m") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    return parser.parse_args(["--model", model, *argv])


def test_serve_flags_become_engine_options(tmp_path: Path) -> None:
    patterns = tmp_path / "p.json"
    patterns.write_text("{}")
    assert cli_serve._engine_options(serve_args()) == {}
    assert cli_serve._engine_options(serve_args("--kv-cache-memory", "2GiB")) == {"kv_cache_memory": "2GiB"}
    options = cli_serve._engine_options(serve_args("--sparse-patterns", str(patterns)))
    assert options == {"sparse_prefill": {"enabled": True, "patterns_path": str(patterns)}}
    with pytest.raises(ConfigError, match=r"--kv-cache-memory configure the local engine; serve a model with --model local:"):
        cli_serve._engine_options(serve_args("--kv-cache-memory", "0.5", model="hf:m"))
    with pytest.raises(ConfigError, match=r"kv_cache_memory='huge'"):
        cli_serve._engine_options(serve_args("--kv-cache-memory", "huge"))


def test_docqa_config_checks_and_passes_engine_options(tmp_path: Path) -> None:
    from terse.pipelines.docqa.config import load_config

    path = tmp_path / "job.toml"
    path.write_text('backend = "local:m"\n[backend_options]\nkv_cache_memory = "1GiB"\nsparse_prefill = true\n')
    options = load_config(path).backend_options
    assert EngineConfig.from_options(options).sparse_prefill.enabled
    path.write_text('backend = "local:m"\n[backend_options]\nkv_cache_memory = 1.5\n')
    with pytest.raises(ConfigError, match=r"kv_cache_memory=1.5"):
        load_config(path)


def test_cuda_graph_blas_choice_is_checked_and_the_faster_timer_wins() -> None:
    from terse.backend.local.cuda_graph import fastest

    assert EngineConfig.from_options({"cuda_graph_blas": "cublaslt"}).cuda_graph_blas == "cublaslt"
    with pytest.raises(ConfigError, match=r"cuda_graph_blas='mkl' must be one of 'auto', 'cublas' or 'cublaslt'"):
        EngineConfig(cuda_graph_blas="mkl")
    calls: list[str] = []

    def timer(name: str, times: list[float]) -> object:
        def run() -> float:
            calls.append(name)
            return times.pop(0)
        return run

    # medians 5.0 vs 4.0 though "a" has the single fastest call; calls interleave a, b, a, b, ...
    assert fastest({"a": timer("a", [1.0, 5.0, 6.0]), "b": timer("b", [4.0, 4.0, 9.0])}, 3) == "b"
    assert calls == ["a", "b"] * 3
    assert fastest({"a": timer("a", [2.0]), "b": timer("b", [2.0])}, 1) == "a"  # a tie keeps the first
