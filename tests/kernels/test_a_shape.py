"""a_shape_attention (sinks + local window) against its float32 reference."""

from __future__ import annotations

import pytest
import torch

from terse.errors import KernelInputError
from terse.kernels.a_shape import a_shape_attention
from terse.kernels.reference import a_shape_mask, reference_a_shape_attention
from tests.kernels.helpers import dense_causal, make_batch, rel_err


def test_mask_definition():
    mask = a_shape_mask(torch.tensor([2]), torch.tensor([3]), 4, 8)[0]  # queries at positions 4..7, sinks 0-1, window 3
    expected = [
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 1],
    ]
    assert mask.int().tolist() == expected


@pytest.mark.parametrize(
    ("head_dim", "num_q_heads", "num_kv_heads", "block"),
    [(64, 4, 4, 16), (128, 4, 2, 16), (64, 4, 1, 32)],
)
def test_matches_reference(head_dim, num_q_heads, num_kv_heads, block):
    batch = make_batch([50, 21], [80, 21], num_q_heads, num_kv_heads, head_dim, seed=block + head_dim)
    sinks = torch.tensor([0, 3, 17, 40][:num_q_heads], dtype=torch.int32)
    windows = torch.tensor([1, 20, 33, 500][:num_q_heads], dtype=torch.int32)
    kw = {"block_size_q": block, "block_size_k": block}
    out = a_shape_attention(batch, sinks, windows, head_dim**-0.5, **kw)
    ref = reference_a_shape_attention(batch, sinks, windows, head_dim**-0.5)
    assert rel_err(out, ref) < 1e-5


def test_full_window_is_dense_causal():
    batch = make_batch([40], [70], 2, 1, 64, seed=2)
    out = a_shape_attention(
        batch, torch.zeros(2, dtype=torch.int32), torch.full((2,), 71, dtype=torch.int32), 0.125,
        block_size_q=16, block_size_k=16,
    )
    assert rel_err(out, dense_causal(batch, 0.125)) < 1e-5


def test_rejects_per_head_tensors_of_wrong_shape():
    batch = make_batch([16], [16], 2, 1, 64)
    with pytest.raises(KernelInputError, match="one per head"):
        a_shape_attention(batch, torch.zeros(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), 0.1)
    with pytest.raises(KernelInputError, match="window_len must be >= 1"):
        a_shape_attention(batch, torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), 0.1)
