"""The reference masks against per-token loops written straight from each format's definition."""

from __future__ import annotations

import torch

from terse.kernels.reference import block_sparse_mask, causal_mask, vertical_slash_mask


def test_causal_mask_with_prefix_offset():
    assert causal_mask(2, 4, torch.device("cpu")).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_vertical_slash_mask_matches_loops():
    q_len, k_len, block_q, block_k = 13, 29, 4, 8
    verticals, slashes = [2, 17, 17, 40, -1], [0, 3, 9, 30, -1]
    mask = vertical_slash_mask(
        torch.tensor([verticals]), torch.tensor([slashes]), q_len, k_len, block_q, block_k
    )[0]
    offset = k_len - q_len
    for i in range(q_len):
        m = i // block_q
        block_positions = [offset + r for r in range(m * block_q, min((m + 1) * block_q, q_len))]
        for j in range(k_len):
            on_diagonal_block = any(
                p - d >= 0 and (p - d) // block_k == j // block_k
                for d in slashes if 0 <= d < k_len for p in block_positions
            )
            expected = j <= offset + i and (j in verticals or on_diagonal_block)
            assert bool(mask[i, j]) == expected, (i, j)


def test_block_sparse_mask_matches_loops():
    q_len, k_len, block = 10, 20, 4
    block_idx = torch.tensor([[[4, 0, 9], [1, 2, 0], [0, 3, 4]]])  # block 9 is past the keys: ignored
    block_count = torch.tensor([[3, 1, 2]])
    col_idx = torch.tensor([[[13, 0], [19, 5], [2, 0]]])
    col_count = torch.tensor([[1, 2, 0]])
    mask = block_sparse_mask(block_idx, block_count, q_len, k_len, block, block, col_idx, col_count)[0]
    for i in range(q_len):
        m = i // block
        blocks = block_idx[0, m, : block_count[0, m]].tolist()
        cols = col_idx[0, m, : col_count[0, m]].tolist()
        for j in range(k_len):
            expected = j <= k_len - q_len + i and (j // block in blocks or j in cols)
            assert bool(mask[i, j]) == expected, (i, j)
