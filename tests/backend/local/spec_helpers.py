"""Helpers of the speculative decoding tests: engines with and without speculation, prompts that repeat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from terse.backend.local.engine import LocalEngine

BS = 4
BASE: dict[str, Any] = {"kv_block_size": BS, "max_num_batched_tokens": 64, "max_model_len": 512, "num_kv_blocks": 600}
SPEC: dict[str, Any] = {"num_draft_tokens": 4, "min_acceptance": 0.0, "draft_ahead": True}  # the guessing path
"""Never backs off: every match is verified."""

REPEATING = [
    "the quick brown fox jumps over the lazy dog " * 6,
    "Alice works at Acme Corp in Paris. Bob founded Globex in 1998. " * 4,
    "numbers 3.14 42 and 2026-11-21; " * 8,
    "def f(x): return x * 2\n" * 5,
    "A paged KV cache stores keys and values in fixed-size blocks",
]


def engine(path: Path, speculative: Any = None, **fields: Any) -> LocalEngine:
    """A tiny-model engine; `speculative` None decodes one token per step."""
    return LocalEngine.from_spec(str(path), **(BASE | {"speculative": speculative} | fields))


def assert_no_leak(eng: LocalEngine) -> None:
    """Every block is free or held once by the prefix cache."""
    cached = eng.prefix_cache.num_cached_blocks if eng.prefix_cache is not None else 0
    assert eng.allocator.num_free_blocks + cached == eng.num_kv_blocks
    assert all(eng.allocator.ref_count(b) <= 1 for b in range(eng.num_kv_blocks))
