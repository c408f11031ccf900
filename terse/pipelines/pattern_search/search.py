"""Offline per-head pattern search on a sample prompt.

For every layer and query head, each candidate pattern is estimated on the sample (the same online
estimators the prefill runs), and scored by
    recall  the share of the head's dense attention mass the pattern's mask keeps, averaged over
            `num_sample_rows` query rows spread over the second half of the prompt (plus the last);
    cost    the key tiles the kernel would compute over those of dense causal attention (columns count
            as ceil(columns / block_size_k) gathered tiles per query block).
The cheapest candidate with recall >= target_mass wins; a head no candidate satisfies stays dense.
Counts found at the sample's length are used as-is at other lengths (estimation adapts which columns,
diagonals and blocks; the budgets stay), so search on a prompt as long as the prompts that will be served.

q/k per layer come from the caller (post-rotary query and key states of one sample prompt, e.g. captured
by the engine's model with a forward hook): q [L, Hq, D], k [L, Hkv, D].
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from terse.errors import ConfigError
from terse.kernels.checks import num_blocks
from terse.kernels.estimate import estimate_vertical_slash
from terse.kernels.estimate_blocks import estimate_block_sparse
from terse.kernels.patterns import (
    AShapePattern,
    BlockSparsePattern,
    DensePattern,
    HeadPattern,
    ModelPatterns,
    VerticalSlashPattern,
)
from terse.kernels.prefill_config import EstimateConfig
from terse.kernels.varlen import VarlenBatch
from terse.kernels.vertical_slash import convert_vertical_slash

DEFAULT_CANDIDATES: tuple[HeadPattern, ...] = (
    AShapePattern(num_sink_tokens=64, window_len=1024),
    AShapePattern(num_sink_tokens=64, window_len=4096),
    VerticalSlashPattern(num_vertical=256, num_slash=64),
    VerticalSlashPattern(num_vertical=1024, num_slash=256, target_mass=0.95),
    VerticalSlashPattern(num_vertical=2048, num_slash=1024, target_mass=0.98),
    BlockSparsePattern(num_blocks=16),
    BlockSparsePattern(num_blocks=64, target_mass=0.95),
)


@dataclass(frozen=True)
class SearchConfig:
    """What the search tries and what it must keep."""

    target_mass: float = 0.95
    """A pattern qualifies for a head when it keeps at least this share of dense attention mass."""
    num_sample_rows: int = 256
    """Query rows whose dense attention measures recall (spread over the prompt's second half)."""
    candidates: tuple[HeadPattern, ...] = DEFAULT_CANDIDATES
    """Patterns tried for every head (dense is the fallback and need not be listed)."""
    block_size_q: int = 64
    """Query block size the prefill will run with (costs are counted in these tiles)."""
    block_size_k: int = 64
    """Key block size the prefill will run with."""
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    """Estimator knobs, as the prefill will use them."""

    def __post_init__(self) -> None:
        if not 0.0 < self.target_mass <= 1.0:
            raise ConfigError(f"target_mass={self.target_mass}; it must be in (0, 1]")
        if self.num_sample_rows < 1:
            raise ConfigError(f"num_sample_rows={self.num_sample_rows}; it must be >= 1")


class HeadScore(NamedTuple):
    """One head's chosen pattern and how it scored."""

    pattern: HeadPattern
    recall: float
    cost: float


class RowIndex(NamedTuple):
    """One head's index in block form (the input of `rows_mask`)."""

    block_idx: torch.Tensor  # [NQB, W] int32
    block_count: torch.Tensor  # [NQB] int32
    col_idx: torch.Tensor | None  # [NQB, C] int32
    col_count: torch.Tensor | None  # [NQB] int32


def sample_rows(length: int, num_rows: int, device: torch.device) -> torch.Tensor:
    """Distinct query rows spread over the second half of a prompt, the last one included."""
    rows = torch.linspace(length // 2, length - 1, min(num_rows, length - length // 2), device=device)
    return rows.round().long().unique()


def dense_row_probs(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """q [L, Hq, D], k [L, Hkv, D] -> causal softmax of the given rows, [Hq, R, L] float32."""
    length, num_q_heads = q.shape[0], q.shape[1]
    group = num_q_heads // k.shape[1]
    k_rep = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    scores = torch.matmul(q[rows].float().transpose(0, 1), k_rep.transpose(1, 2)) * scale  # [Hq, R, L]
    future = torch.arange(length, device=q.device)[None, :] > rows[:, None]
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def rows_mask(index: RowIndex, rows: torch.Tensor, length: int, block_size_q: int, block_size_k: int) -> torch.Tensor:
    """The index's mask on the given rows of a q_len = k_len = length prompt -> [R, L] bool."""
    m = rows // block_size_q
    num_k_blocks = num_blocks(length, block_size_k)
    ids = index.block_idx[m].long()
    valid = torch.arange(ids.shape[-1], device=rows.device)[None, :] < index.block_count[m, None]
    selected = torch.zeros(rows.numel(), num_k_blocks + 1, dtype=torch.bool, device=rows.device)
    selected.scatter_(1, torch.where(valid, ids.clamp(max=num_k_blocks), num_k_blocks), True)
    mask = selected[:, :num_k_blocks].repeat_interleave(block_size_k, dim=1)[:, :length]
    if index.col_idx is not None and index.col_count is not None:
        cols = index.col_idx[m].long()
        cvalid = torch.arange(cols.shape[-1], device=rows.device)[None, :] < index.col_count[m, None]
        col_sel = torch.zeros(rows.numel(), length + 1, dtype=torch.bool, device=rows.device)
        col_sel.scatter_(1, torch.where(cvalid, cols.clamp(max=length), length), True)
        mask |= col_sel[:, :length]
    return mask & (torch.arange(length, device=rows.device)[None, :] <= rows[:, None])


def _dense_tiles(length: int, block_size_q: int, block_size_k: int) -> int:
    m = torch.arange(num_blocks(length, block_size_q))
    last_q = torch.clamp((m + 1) * block_size_q, max=length) - 1
    return int((last_q // block_size_k + 1).sum())


def _a_shape_index(pattern: AShapePattern, length: int, bq: int, bk: int) -> RowIndex:
    # the blocks the a-shape kernel visits, with its token-exact mask folded in at row level below
    nqb, nkb = num_blocks(length, bq), num_blocks(length, bk)
    m = torch.arange(nqb)
    first_q, last_q = m * bq, torch.clamp((m + 1) * bq, max=length) - 1
    n = torch.arange(nkb)[None, :]
    sink = n * bk < pattern.num_sink_tokens
    window = (n <= (last_q // bk)[:, None]) & ((n + 1) * bk - 1 >= (first_q - pattern.window_len + 1)[:, None])
    listed = sink | window
    ids = torch.where(listed, n, 1 << 30).sort(-1).values.to(torch.int32)
    return RowIndex(ids, listed.sum(-1).to(torch.int32), None, None)


def _candidate_indices(
    pattern: HeadPattern, q: torch.Tensor, k: torch.Tensor, scale: float, config: SearchConfig
) -> list[RowIndex]:
    """Per head, the index `pattern` estimates on this sample."""
    length, num_heads = q.shape[0], q.shape[1]
    batch = VarlenBatch.from_lengths(q, k, k, [length], [length])  # estimation reads q and k only
    bq, bk = config.block_size_q, config.block_size_k
    if isinstance(pattern, AShapePattern):
        return [_a_shape_index(pattern, length, bq, bk)] * num_heads
    if isinstance(pattern, VerticalSlashPattern):
        vi, si = estimate_vertical_slash(
            batch, torch.full((num_heads,), pattern.num_vertical),
            torch.full((num_heads,), pattern.num_slash), torch.full((num_heads,), pattern.target_mass),
            scale, config=config.estimate,
        )
        idx = convert_vertical_slash(vi, si, batch.layout, block_size_q=bq, block_size_k=bk)
        return [
            RowIndex(idx.block_idx[0, h], idx.block_count[0, h], idx.col_idx[0, h], idx.col_count[0, h])
            for h in range(num_heads)
        ]
    if isinstance(pattern, BlockSparsePattern):
        bidx, bcnt = estimate_block_sparse(
            batch, torch.full((num_heads,), pattern.num_blocks),
            torch.full((num_heads,), pattern.target_mass), scale, block_size_q=bq, block_size_k=bk,
        )
        return [RowIndex(bidx[0, h], bcnt[0, h], None, None) for h in range(num_heads)]
    raise ConfigError(f"cannot search candidate {pattern!r}; use a_shape, vertical_slash or block_sparse")


def _cost(index: RowIndex, dense_tiles: int, block_size_k: int) -> float:
    tiles = int(index.block_count.sum())
    if index.col_count is not None:
        tiles += int(torch.ceil(index.col_count.float() / block_size_k).sum())
    return tiles / dense_tiles


def search_layer(
    q: torch.Tensor, k: torch.Tensor, scale: float, config: SearchConfig | None = None
) -> list[HeadScore]:
    """One layer: q [L, Hq, D], k [L, Hkv, D] of a sample prompt -> the chosen pattern per query head."""
    config = config or SearchConfig()
    length = q.shape[0]
    rows = sample_rows(length, config.num_sample_rows, q.device)
    probs = dense_row_probs(q, k, rows, scale)  # [Hq, R, L]
    dense_tiles = _dense_tiles(length, config.block_size_q, config.block_size_k)
    best: list[HeadScore] = [HeadScore(DensePattern(), 1.0, 1.0) for _ in range(q.shape[1])]
    for pattern in config.candidates:
        for head, index in enumerate(_candidate_indices(pattern, q, k, scale, config)):
            mask = rows_mask(index, rows, length, config.block_size_q, config.block_size_k)
            if isinstance(pattern, AShapePattern):  # token-exact sinks + window inside the visited blocks
                rel = rows[:, None] - torch.arange(length, device=q.device)[None, :]
                mask &= (torch.arange(length, device=q.device)[None, :] < pattern.num_sink_tokens) | (
                    rel < pattern.window_len
                )
            recall = float((probs[head] * mask).sum(-1).mean())
            cost = _cost(index, dense_tiles, config.block_size_k)
            if recall >= config.target_mass and cost < best[head].cost:
                best[head] = HeadScore(pattern, recall, cost)
    return best


def search_model_patterns(
    model_name: str,
    layer_qk: Iterable[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    config: SearchConfig | None = None,
) -> tuple[ModelPatterns, list[list[HeadScore]]]:
    """All layers of one sample prompt -> (ModelPatterns to save, the per-head scores behind them)."""
    scores = [search_layer(q, k, scale, config) for q, k in layer_qk]
    if not scores:
        raise ConfigError("layer_qk is empty; pass one (q, k) pair per layer of the sample prompt")
    layers = tuple(tuple(s.pattern for s in layer) for layer in scores)
    return ModelPatterns(model_name, len(layers), len(layers[0]), layers), scores
