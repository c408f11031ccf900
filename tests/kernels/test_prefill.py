"""The engine entry point: per-head pattern groups, dense fallback, torch and Triton paths agree."""

from __future__ import annotations

import pytest
import torch

from terse.errors import ConfigError, KernelInputError
from terse.kernels.checks import check_device_for_triton
from terse.kernels.patterns import AShapePattern, BlockSparsePattern, DensePattern, VerticalSlashPattern
from terse.kernels.prefill import (
    SparsePrefillConfig,
    choose_prefill_path,
    sparse_prefill,
    sparse_prefill_attention,
)
from terse.kernels.reference import a_shape_mask, masked_attention

from .helpers import dense_causal, make_batch, rel_err

MIXED = [DensePattern(), AShapePattern(4, 16), VerticalSlashPattern(8, 8), BlockSparsePattern(2)]


def config(backend: str, min_sparse_q_len: int = 1) -> SparsePrefillConfig:
    return SparsePrefillConfig(min_sparse_q_len=min_sparse_q_len, block_size_q=16, block_size_k=16, backend=backend)


def test_triton_and_torch_paths_agree_on_mixed_heads():
    batch = make_batch([40, 70], [100, 70], 4, 2, 64, seed=11)
    torch_out = sparse_prefill(batch, MIXED, 0.125, config=config("torch"))
    triton_out = sparse_prefill(batch, MIXED, 0.125, config=config("triton"))
    assert rel_err(triton_out, torch_out) < 1e-5
    # the dense head is exact dense attention; the a-shape head follows its mask
    dense = dense_causal(batch, 0.125)
    assert rel_err(triton_out[:, 0], dense[:, 0]) < 1e-5
    masks = [a_shape_mask(torch.tensor([4]), torch.tensor([16]), q, k) for q, k in [(40, 100), (70, 70)]]
    ref = masked_attention(batch, masks, 0.125, torch.tensor([1], dtype=torch.int32))
    assert rel_err(triton_out[:, 1], ref[:, 1]) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_full_budgets_reproduce_dense_attention(backend):
    batch = make_batch([33, 64], [80, 64], 4, 2, 64, seed=12)
    patterns = [VerticalSlashPattern(100, 100, 1.0), BlockSparsePattern(100, 1.0), AShapePattern(0, 100), DensePattern()]
    out = sparse_prefill(batch, patterns, 0.125, config=config(backend))
    assert rel_err(out, dense_causal(batch, 0.125)) < 1e-5


def test_short_sequences_fall_back_to_dense():
    batch = make_batch([20, 48], [60, 48], 4, 2, 64, seed=13)
    all_dense = sparse_prefill(batch, MIXED, 0.125, config=config("torch", min_sparse_q_len=1000))
    assert rel_err(all_dense, dense_causal(batch, 0.125)) < 1e-5
    mixed = sparse_prefill(batch, MIXED, 0.125, config=config("triton", min_sparse_q_len=30))
    sparse = sparse_prefill(batch, MIXED, 0.125, config=config("torch"))
    assert rel_err(mixed[:20], all_dense[:20]) < 1e-5  # sequence 0 (q_len 20 < 30): dense
    assert rel_err(mixed[20:], sparse[20:]) < 1e-5  # sequence 1: sparse
    assert rel_err(mixed[20:], all_dense[20:]) > 1e-3  # and the sparse patterns did drop something


def test_choose_prefill_path():
    cfg = SparsePrefillConfig(min_sparse_q_len=4096)
    assert choose_prefill_path(4095, cfg) == "dense"
    assert choose_prefill_path(4096, cfg) == "sparse"


def test_errors():
    batch = make_batch([16], [16], 4, 2, 64)
    with pytest.raises(KernelInputError, match="3 head patterns for 4 query heads"):
        sparse_prefill(batch, MIXED[:3], 0.125)
    with pytest.raises(KernelInputError, match="not a head pattern"):
        sparse_prefill(batch, [*MIXED[:3], "dense"], 0.125)  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="block_size_q=100"):
        SparsePrefillConfig(block_size_q=100)
    with pytest.raises(ConfigError, match="min_sparse_q_len=0"):
        SparsePrefillConfig(min_sparse_q_len=0)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    batch = make_batch([16], [16], 4, 2, 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelInputError, match="Triton kernels need CUDA"):
        check_device_for_triton(batch.q)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sequence_without_new_queries(backend):
    batch = make_batch([0, 40], [30, 40], 4, 2, 64, seed=14)
    out = sparse_prefill(batch, MIXED, 0.125, config=config(backend))
    # the same sequence alone, through the entry point that takes loose offsets
    cu_q, cu_k = batch.layout.cu_seqlens_q, batch.layout.cu_seqlens_k
    reference = sparse_prefill_attention(
        batch.q, batch.k[30:], batch.v[30:], cu_q[1:] - 0, cu_k[1:] - 30, 40, 40, MIXED, 0.125, config=config("torch"),
    )
    assert out.shape == (40, 4, 64)
    assert rel_err(out, reference) < 1e-5


def test_torch_path_row_chunks(monkeypatch):
    import terse.kernels.prefill as prefill

    batch = make_batch([40, 70], [100, 70], 4, 2, 64, seed=15)
    whole = sparse_prefill(batch, MIXED, 0.125, config=config("torch"))
    monkeypatch.setattr(prefill, "TORCH_ROWS_PER_CHUNK", 16)
    chunked = sparse_prefill(batch, MIXED, 0.125, config=config("torch"))
    assert rel_err(chunked, whole) < 1e-6


def test_entry_point_imports_without_triton():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, terse.kernels as k; k.sparse_prefill; k.VarlenBatch; k.load_or_default; print('triton' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PATH": ""}, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.strip() == "False"


def test_torch_path_takes_any_head_dim_and_triton_names_its_limit():
    batch = make_batch([30], [50], 4, 2, 16, seed=16)
    patterns = [VerticalSlashPattern(100, 100, 1.0), BlockSparsePattern(100, 1.0), AShapePattern(0, 100), DensePattern()]
    out = sparse_prefill(batch, patterns, 0.25, config=config("auto"))  # CPU: torch path
    assert rel_err(out, dense_causal(batch, 0.25)) < 1e-5
    with pytest.raises(KernelInputError, match="head_dim 16 is not supported by the Triton kernels"):
        sparse_prefill(batch, patterns, 0.25, config=config("triton"))
