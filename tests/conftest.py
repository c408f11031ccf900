"""Shared fixtures: tiny random models built once per test session (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

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
