"""Settings of the sparse prefill kernels: `SparsePrefillConfig` and its `EstimateConfig`. Imports no torch,
so the engine's config (`terse.backend.local.config.SparsePrefillSettings`) holds them directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from terse.errors import ConfigError
from terse.validation import check_choice, check_int

BLOCK_SIZES = (16, 32, 64, 128)
"""Tile sizes the kernels are compiled for."""


@dataclass(frozen=True)
class EstimateConfig:
    """Knobs of the online estimators (shared by every head of a call)."""

    last_q_len: int = 64
    """Queries (the last ones of each sequence) whose attention scores columns and diagonals."""
    num_sink_tokens: int = 4
    """First key columns always kept by vertical-slash heads (attention sinks)."""
    num_local_diagonals: int = 64
    """Diagonal offsets 0 .. n - 1 always kept by vertical-slash heads (the local window)."""

    def __post_init__(self) -> None:
        check_int("last_q_len", self.last_q_len, low=1, example=64)
        # at least one sink column and one local diagonal, so that no query row is empty
        check_int("num_sink_tokens", self.num_sink_tokens, low=1, example=4)
        check_int("num_local_diagonals", self.num_local_diagonals, low=1, example=64)


@dataclass(frozen=True)
class SparsePrefillConfig:
    """How one layer's prefill attention is computed."""

    min_sparse_q_len: int = 32768
    """Sequences with fewer new query tokens than this run dense (measured crossover on the H200)."""
    block_size_q: int = 64
    """Query tile and index block size (16, 32, 64 or 128)."""
    block_size_k: int = 64
    """Key tile and index block size (16, 32, 64 or 128)."""
    backend: Literal["auto", "triton", "torch"] = "auto"
    """auto: Triton kernels on CUDA (head dims 64 / 128), torch otherwise; triton on the CPU needs
    TRITON_INTERPRET=1."""
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    """Online estimation knobs (last queries, forced sinks and local diagonals)."""

    def __post_init__(self) -> None:
        check_int("min_sparse_q_len", self.min_sparse_q_len, low=1, example=32768)
        check_choice("block_size_q", self.block_size_q, BLOCK_SIZES, error=ConfigError)
        check_choice("block_size_k", self.block_size_k, BLOCK_SIZES, error=ConfigError)
        check_choice("backend", self.backend, ("auto", "triton", "torch"))
