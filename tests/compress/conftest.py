"""Fixtures for compression tests: a real tokenizer counter, hf scorers over tiny models, a doc set."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import terse
from terse.backend.base import Backend


@pytest.fixture(scope="session")
def counter(tiny_llama: Path) -> Callable[[str], int]:
    """Token counter of the tiny Llama's (byte-level BPE) tokenizer, without special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="session")
def fast_target(tiny_llama: Path) -> object:
    """The tiny Llama's tokenizer as a target tokenizer with offsets (budgets priced from one tokenization)."""
    from transformers import AutoTokenizer

    from terse.compress.tokenizer import FastTokenizerTarget

    return FastTokenizerTarget(AutoTokenizer.from_pretrained(tiny_llama))


@pytest.fixture(scope="session")
def hf_scorer(tiny_llama: Path) -> Iterator[Backend]:
    backend = terse.load_backend(f"hf:{tiny_llama}", device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def small_window_scorer(tiny_model_factory: Callable[..., Path]) -> Iterator[Backend]:
    """A tiny GPT-2 with a 160-token window: inputs longer than it must be chunked."""
    backend = terse.load_backend(f"hf:{tiny_model_factory('gpt2', max_position_embeddings=160)}", device="cpu")
    yield backend
    backend.close()
