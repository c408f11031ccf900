"""Shared fixtures: tiny random models built once per test session (no downloads)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from terse.backend import Backend, load_backend

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`factory(arch="llama", **overrides) -> Path`: a cached tiny model directory per argument set."""
    cache: dict[tuple[object, ...], Path] = {}

    def factory(arch: str = "llama", **overrides: object) -> Path:
        key = (arch, *sorted(overrides.items()))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = build_tiny_model(path, arch, **overrides)  # type: ignore[arg-type]
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: Callable[..., Path]) -> Path:
    """A tiny random Llama (2 layers, hidden 64, 4 q heads / 2 kv heads, vocab ~512) directory."""
    return tiny_model_factory("llama")


@contextlib.contextmanager
def backend_over_http(model_dir: Path) -> Iterator[Backend]:
    """The OpenAI-compatible backend talking to a real `terse serve` (loopback) in front of terse's
    engine on `model_dir`: the whole HTTP path, for tests that must run on every kind of backend."""
    from terse.pipelines.server import ServerConfig, ServerThread, engine_app

    engine = load_backend(f"local:{model_dir}")
    server = ServerThread(engine_app(engine, ServerConfig(served_model_names=("tiny",)))).start()
    remote = load_backend(f"openai:{server.url}/v1#tiny", api_key="unused")
    try:
        yield remote
    finally:
        remote.close()
        server.stop()
        engine.close()
