"""A plain-transformers backend over the tiny random Llama, shared by this directory's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import terse
from terse.backend.base import Backend


@pytest.fixture(scope="session")
def hf_backend(tiny_llama: Path) -> Iterator[Backend]:
    backend = terse.load_backend(f"hf:{tiny_llama}")
    yield backend
    backend.close()
