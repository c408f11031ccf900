"""Vertical-slash index conversion (exact lists) and the kernel against its float32 reference."""

from __future__ import annotations

import pytest
import torch

from terse.kernels.reference import reference_vertical_slash_attention
from terse.kernels.vertical_slash import SENTINEL, convert_vertical_slash, vertical_slash_attention
from tests.kernels.helpers import dense_causal, layout, make_batch, rel_err


def rows(ids: torch.Tensor, counts: torch.Tensor) -> list[list[int]]:
    return [r[:c].tolist() for r, c in zip(ids, counts.tolist())]


def convert(verticals: list[int], slashes: list[int], q_len: int, k_len: int, block_q: int = 16, block_k: int = 16):
    vi = torch.tensor([[verticals]], dtype=torch.int32)
    si = torch.tensor([[slashes]], dtype=torch.int32)
    index = convert_vertical_slash(
        vi, si, layout([q_len], [k_len]), block_size_q=block_q, block_size_k=block_k
    )
    return rows(index.block_idx[0, 0], index.block_count[0, 0]), rows(index.col_idx[0, 0], index.col_count[0, 0])


def test_diagonals_to_blocks_and_columns_without_double_counting():
    # q_len = k_len = 64, blocks of 16: diagonal 0 -> own block; diagonal 20 crosses block boundaries
    blocks, cols = convert([5, 17, 40, 40, 63, 70, -1], [0, 20, 64, 100, -1], 64, 64)
    assert blocks == [[0], [0, 1], [0, 1, 2], [1, 2, 3]]
    # columns inside a listed block or after the block's last query are dropped; 70 is past the sequence
    assert cols == [[], [], [], [5]]


def test_aligned_diagonal_and_overlapping_diagonals_merge():
    blocks, _ = convert([0], [16, 17, 18, 0], 64, 64)
    assert blocks == [[0], [0, 1], [0, 1, 2], [1, 2, 3]]


def test_prefix_offset_queries():
    # 20 new queries over 64 tokens: query blocks cover absolute positions 44..59 and 60..63
    blocks, cols = convert([5, 30, 62], [0, 50], 20, 64)
    assert blocks == [[0, 2, 3], [0, 3]]
    assert cols == [[30], [30]]


def test_rectangular_tiles():
    # 32-query blocks over 16-key blocks: diagonal 8 in query block 1 (32..63) covers keys 24..55
    blocks, _ = convert([], [8], 64, 64, block_q=32, block_k=16)
    assert blocks == [[0, 1], [1, 2, 3]]


def test_padding_is_sentinel_and_counts_bound_rows():
    vi = torch.tensor([[[3, -1]], [[-1, -1]]], dtype=torch.int32)
    si = torch.tensor([[[0, 5]], [[0, -1]]], dtype=torch.int32)
    index = convert_vertical_slash(vi, si, layout([40, 16], [40, 16]), block_size_q=16, block_size_k=16)
    assert index.block_count[1, 0].tolist() == [1, 0, 0]  # sequence 1 has one query block
    assert torch.all(index.block_idx[1, 0, 1:] == SENTINEL)


@pytest.mark.parametrize(
    ("head_dim", "num_q_heads", "num_kv_heads", "block_q", "block_k"),
    [(64, 4, 4, 16, 16), (128, 4, 2, 16, 16), (64, 4, 1, 32, 16), (64, 2, 2, 16, 32)],
)
def test_kernel_matches_reference(head_dim, num_q_heads, num_kv_heads, block_q, block_k):
    batch = make_batch([37, 64], [90, 64], num_q_heads, num_kv_heads, head_dim, seed=block_q + head_dim)
    gen = torch.Generator().manual_seed(7)
    vi = torch.randint(-1, 100, (2, num_q_heads, 9), generator=gen, dtype=torch.int32)
    si = torch.randint(-1, 100, (2, num_q_heads, 5), generator=gen, dtype=torch.int32)
    kw = {"block_size_q": block_q, "block_size_k": block_k}
    out = vertical_slash_attention(batch, vi, si, head_dim**-0.5, **kw)
    ref = reference_vertical_slash_attention(batch, vi, si, head_dim**-0.5, **kw)
    assert rel_err(out, ref) < 1e-5


def test_every_diagonal_is_dense_attention():
    batch = make_batch([30, 48], [60, 48], 2, 1, 64, seed=9)
    si = torch.arange(60, dtype=torch.int32).expand(2, 2, 60).contiguous()
    vi = torch.full((2, 2, 1), -1, dtype=torch.int32)
    out = vertical_slash_attention(batch, vi, si, 0.125, block_size_q=16, block_size_k=16)
    assert rel_err(out, dense_causal(batch, 0.125)) < 1e-5


def test_random_conversion_rows_are_sorted_distinct_and_disjoint():
    gen = torch.Generator().manual_seed(3)
    vi = torch.randint(-1, 300, (2, 3, 40), generator=gen, dtype=torch.int32)
    si = torch.randint(-1, 300, (2, 3, 30), generator=gen, dtype=torch.int32)
    index = convert_vertical_slash(vi, si, layout([100, 256], [256, 256]), block_size_q=32, block_size_k=16)
    for b in range(2):
        for h in range(3):
            for m in range(index.block_count.shape[2]):
                blocks = index.block_idx[b, h, m, : index.block_count[b, h, m]].tolist()
                cols = index.col_idx[b, h, m, : index.col_count[b, h, m]].tolist()
                assert blocks == sorted(set(blocks)) and cols == sorted(set(cols))
                assert not {c // 16 for c in cols} & set(blocks)
