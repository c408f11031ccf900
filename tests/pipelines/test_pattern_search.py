"""Offline per-head search picks the pattern that keeps the target mass at the least cost."""

from __future__ import annotations

import math

import pytest
import torch

from terse.errors import ConfigError
from terse.kernels.patterns import (
    AShapePattern,
    BlockSparsePattern,
    DensePattern,
    VerticalSlashPattern,
    load_patterns,
    save_patterns,
)
from terse.pipelines.pattern_search.search import SearchConfig, search_layer, search_model_patterns

LENGTH, DIM = 1024, 64
CANDIDATES = (
    AShapePattern(num_sink_tokens=16, window_len=128),
    VerticalSlashPattern(num_vertical=8, num_slash=66),
    BlockSparsePattern(num_blocks=4),
)


def three_heads(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Head 0: spread attention; head 1: a sink only; head 2: sink + a heavy column + a far diagonal."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(LENGTH, 3, DIM, generator=gen) * 0.05
    k = torch.randn(LENGTH, 3, DIM, generator=gen) * 0.05
    u = torch.randn(DIM, generator=gen)
    u /= u.norm()
    for h in (1, 2):
        q[:, h] += 4 * u
        k[0, h] += u * 14 * math.sqrt(DIM) / 4
    r = torch.randn(LENGTH, DIM, generator=gen)
    q[:, 2] += r
    k[700, 2] += u * 13 * math.sqrt(DIM) / 4
    k[: LENGTH - 300, 2] += 1.7 * r[300:]  # diagonal 300: logit ~ 1.7 * 64 / 8 = 13.6
    return q, k


def test_search_layer_choices():
    q, k = three_heads()
    config = SearchConfig(target_mass=0.9, candidates=CANDIDATES, num_sample_rows=64)
    scores = search_layer(q, k, DIM**-0.5, config)
    assert isinstance(scores[0].pattern, DensePattern) and scores[0].cost == 1.0
    assert not isinstance(scores[1].pattern, DensePattern) and scores[1].cost < 0.5
    assert scores[1].recall >= 0.9
    assert isinstance(scores[2].pattern, VerticalSlashPattern)  # only it holds the column and the diagonal
    assert scores[2].recall >= 0.9 and scores[2].cost < 0.5


def test_search_model_patterns_round_trips(tmp_path):
    q, k = three_heads(seed=1)
    config = SearchConfig(target_mass=0.9, candidates=CANDIDATES, num_sample_rows=32)
    patterns, scores = search_model_patterns("tiny", [(q, k), (q, k)], DIM**-0.5, config)
    assert patterns.num_layers == 2 and patterns.num_q_heads == 3
    assert [s.pattern for s in scores[0]] == list(patterns.layer(0))
    save_patterns(patterns, tmp_path / "p.json")
    assert load_patterns(tmp_path / "p.json") == patterns


def test_search_config_validation():
    with pytest.raises(ConfigError, match="target_mass=0"):
        SearchConfig(target_mass=0)
    with pytest.raises(ConfigError, match="layer_qk is empty"):
        search_model_patterns("m", [], 0.1)
