"""The Triton paged-decode kernel against the torch gather path (Triton's CPU interpreter)."""

from __future__ import annotations

import pytest
import torch

from terse.backend.local.attention import paged_decode_torch
from terse.backend.local.paged_decode import paged_decode_triton  # interpreted: see __init__.py


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 16), (8, 1, 32), (4, 4, 16)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_torch_path(num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int) -> None:
    gen = torch.Generator().manual_seed(num_heads * 100 + head_dim + num_splits)
    num_blocks, block_size = 24, 16
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(4, num_heads, head_dim, generator=gen)
    tables = torch.randperm(num_blocks, generator=gen)[:20].view(4, 5)
    context_lens = torch.tensor([1, 16, 17, 80], dtype=torch.int32)  # one token, one full block, ragged, full
    got = paged_decode_triton(q, kv, tables, context_lens, num_splits=num_splits)
    expected = paged_decode_torch(q, kv, tables, context_lens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_torch_path_equals_dense_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 6, 4, 2, 8, generator=gen)
    q = torch.randn(1, 4, 8, generator=gen)
    table = torch.tensor([[5, 2, 0]])
    ctx = 10
    k = kv[0, table[0]].reshape(-1, 2, 8)[:ctx].repeat_interleave(2, dim=1)  # [ctx, H, D]
    v = kv[1, table[0]].reshape(-1, 2, 8)[:ctx].repeat_interleave(2, dim=1)
    probs = torch.softmax(torch.einsum("hd,shd->hs", q[0], k) / 8**0.5, dim=-1)
    expected = torch.einsum("hs,shd->hd", probs, v)
    got = paged_decode_torch(q, kv, table, torch.tensor([ctx], dtype=torch.int32))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
