"""A plain-transformers backend over the tiny random Llama, shared by this directory's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import terse
from terse.backend.base import Backend
from tests.conftest import backend_over_http


@pytest.fixture(scope="session")
def hf_backend(tiny_llama: Path) -> Iterator[Backend]:
    backend = terse.load_backend(f"hf:{tiny_llama}")
    yield backend
    backend.close()


@pytest.fixture(scope="session", params=["hf", "openai"])
def organize_backend(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[Backend]:
    """SoT and DAG run on plain transformers and over HTTP: the OpenAI-compatible backend talking to a
    real `terse serve` in front of terse's engine (same tiny weights)."""
    if request.param == "hf":
        backend = terse.load_backend(f"hf:{tiny_llama}")
        yield backend
        backend.close()
        return
    with backend_over_http(tiny_llama) as remote:
        yield remote
