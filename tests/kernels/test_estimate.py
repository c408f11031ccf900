"""Online estimation finds planted sinks, columns, diagonals and blocks; budgets behave as documented."""

from __future__ import annotations

import math

import pytest
import torch

from terse.errors import ConfigError
from terse.kernels.estimate import diagonal_sums, estimate_vertical_slash, select_by_budget
from terse.kernels.estimate_blocks import estimate_block_sparse
from terse.kernels.prefill_config import EstimateConfig
from terse.kernels.varlen import VarlenBatch
from terse.kernels.vertical_slash import SENTINEL

LENGTH, NUM_Q, NUM_KV, DIM = 512, 4, 2, 64


def planted(column: int, offset: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [L, 4, 64], k [L, 2, 64]: a sink at key 0, a heavy column, a diagonal at `offset`, for every head."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(LENGTH, NUM_KV, DIM, generator=gen)
    u = torch.randn(DIM, generator=gen)
    u /= u.norm()
    k = torch.randn(LENGTH, NUM_KV, DIM, generator=gen) * 0.5
    k[0] += u * 8 * math.sqrt(DIM) / 4
    k[column] += u * 7 * math.sqrt(DIM) / 4
    k[: LENGTH - offset] += 1.2 * r[offset:]  # logit q_i . k_{i - offset} / 8 ~ 1.2 * 64 / 8 = 9.6
    q = (r + 4 * u).repeat_interleave(NUM_Q // NUM_KV, dim=1)
    return q + 0.05 * torch.randn(q.shape, generator=gen), k


def test_diagonal_sums_match_brute_force():
    probs = torch.rand(3, 5, 12)
    expected = torch.zeros(3, 12)
    for i in range(5):
        position = 12 - 5 + i
        for j in range(position + 1):
            expected[:, position - j] += probs[:, i, j]
    assert torch.allclose(diagonal_sums(probs), expected, atol=1e-6)


def test_select_by_budget_forced_cap_and_mass():
    scores = torch.tensor([[0.05, 0.5, 0.3, 0.1, 0.05], [0.05, 0.5, 0.3, 0.1, 0.05]])
    forced = torch.tensor([[True, False, False, False, False]] * 2)
    ids, counts = select_by_budget(scores, forced, torch.tensor([3, 5]), torch.tensor([1.0, 0.8]))
    # row 0: the cap (3) -> forced 0 + best two (1, 2); row 1: mass 0.8 reached by 0 + 1 + 2 (0.85)
    assert counts.tolist() == [3, 3]
    assert ids[0, :3].tolist() == [0, 1, 2] and ids[1, :3].tolist() == [0, 1, 2]
    ids, counts = select_by_budget(scores, forced, torch.tensor([5, 5]), torch.tensor([0.01, 1.0]))
    assert counts.tolist() == [1, 5]  # forced items are kept even when the target is already met
    assert ids[0].tolist()[1:] == [SENTINEL] * 4


def test_vertical_slash_finds_planted_structure():
    q, k = planted(column=300, offset=100)
    batch = VarlenBatch.from_lengths(q, k, k, [LENGTH], [LENGTH])
    caps = torch.tensor([6] * NUM_Q)
    vi, si = estimate_vertical_slash(
        batch, caps, torch.tensor([66] * NUM_Q), torch.ones(NUM_Q), DIM**-0.5,
        config=EstimateConfig(num_sink_tokens=4, num_local_diagonals=64),
    )
    for h in range(NUM_Q):
        assert {0, 1, 2, 3, 300} <= set(vi[0, h].tolist())
        assert set(range(64)) | {100} <= set(si[0, h].tolist())


def test_vertical_slash_mass_target_shrinks_the_set():
    q, k = planted(column=300, offset=100, seed=1)
    batch = VarlenBatch.from_lengths(q, k, k, [LENGTH], [LENGTH])
    full = estimate_vertical_slash(
        batch, torch.tensor([200] * NUM_Q), torch.tensor([200] * NUM_Q),
        torch.ones(NUM_Q), DIM**-0.5,
    )
    small = estimate_vertical_slash(
        batch, torch.tensor([200] * NUM_Q), torch.tensor([200] * NUM_Q),
        torch.full((NUM_Q,), 0.5), DIM**-0.5,
    )
    assert (small[0] >= 0).sum() < (full[0] >= 0).sum()
    assert 300 in small[0][0, 0].tolist() or 0 in small[0][0, 0].tolist()


def test_block_sparse_finds_planted_block_and_keeps_sink_and_diagonal():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(LENGTH, NUM_Q, DIM, generator=gen) * 0.3
    k = torch.randn(LENGTH, NUM_KV, DIM, generator=gen) * 0.3
    w = torch.randn(DIM, generator=gen)
    q[6 * 64 : 7 * 64] += w  # query block 6 ...
    k[2 * 64 : 3 * 64] += w  # ... attends key block 2
    idx, count = estimate_block_sparse(
        VarlenBatch.from_lengths(q, k, k, [LENGTH], [LENGTH]), torch.tensor([3] * NUM_Q), torch.ones(NUM_Q), DIM**-0.5,
        block_size_q=64, block_size_k=64,
    )
    for h in range(NUM_Q):
        assert idx[0, h, 6, : count[0, h, 6]].tolist() == [0, 2, 6]
        for m in range(8):
            row = idx[0, h, m, : count[0, h, m]].tolist()
            assert 0 in row and m in row and all(n <= m for n in row)


def test_block_sparse_prefix_offset_rows():
    q = torch.randn(40, NUM_Q, DIM)
    k = torch.randn(100, NUM_KV, DIM)
    idx, count = estimate_block_sparse(
        VarlenBatch.from_lengths(q, k, k, [40], [100]), torch.tensor([1] * NUM_Q), torch.ones(NUM_Q),
        0.125, block_size_q=16, block_size_k=16,
    )
    # query blocks cover positions 60..75, 76..91, 92..99: sink block + their own diagonal blocks
    assert idx[0, 0, 0, : count[0, 0, 0]].tolist() == [0, 3, 4]
    assert idx[0, 0, 2, : count[0, 0, 2]].tolist() == [0, 5, 6]


def test_estimate_config_validation():
    with pytest.raises(ConfigError, match="last_q_len=0"):
        EstimateConfig(last_q_len=0)
    with pytest.raises(ConfigError, match="num_sink_tokens=0"):
        EstimateConfig(num_sink_tokens=0)
