"""Online index estimation: which columns, diagonals or blocks each head should compute, from the input.

vertical-slash  the last `last_q_len` queries of a sequence attend (softmax, causal) to all its keys;
                column scores sum each key's probability over those rows, diagonal scores sum along
                each offset d = query position - key position. Both are averaged over rows, so a score is
                a share of attention mass.
block-sparse    queries and keys are mean-pooled per block; pooled scores (causal at block level,
                softmax per query block) rank the key blocks of each query block.

Budgets are per head: a count cap, and a mass target p (the smallest top-ranked set whose scores sum
to >= p, never more than the cap; p >= 1 means "the cap"). Sinks (the first columns / key block 0) and
the local diagonals (offsets 0 .. num_local - 1 / the query block's own diagonal blocks) are always
kept, so no query row is ever empty. Work runs in torch on the inputs' device, chunked over heads and
query blocks to bound memory; the only Python loops are over sequences and those chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from terse.kernels.checks import num_blocks
from terse.kernels.varlen import VarlenBatch
from terse.kernels.vertical_slash import SENTINEL
from terse.validation import check_int

FORCED_BONUS = 4.0  # added to forced items' scores (real scores are <= 1) so they rank first
MAX_CHUNK_ELEMENTS = 1 << 27


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


def select_by_budget(
    scores: torch.Tensor, forced: torch.Tensor, caps: torch.Tensor, target_mass: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick per row the forced items, then the best others, up to the cap or until the mass target.

    scores [R, N] (shares of mass, >= 0), forced [R, N] bool, caps [R] int, target_mass [R] float.
    -> (ids [R, W] int32, ascending, padded with SENTINEL; counts [R] int32), W = the largest count.
    """
    num_items = scores.shape[-1]
    width = int(min(int(caps.max()), num_items)) if caps.numel() else 0
    width = max(width, int(forced.sum(-1).max()) if forced.numel() else 0, 1)
    width = min(width, num_items)
    key = scores + forced.to(scores.dtype) * FORCED_BONUS
    top_key, top_ids = torch.topk(key, width, dim=-1)  # [R, W], best first
    top_mass = torch.where(top_key >= FORCED_BONUS, top_key - FORCED_BONUS, top_key)
    covered = torch.cumsum(top_mass, dim=-1)  # mass of the best j + 1 items
    # smallest prefix reaching the target: 1 + number of prefixes still below it
    reach = 1 + (covered < target_mass[:, None] * scores.sum(-1, keepdim=True) - 1e-6).sum(-1)
    counts = torch.minimum(reach, caps.to(reach.dtype))
    counts = torch.maximum(counts, forced.sum(-1)).clamp(max=width)
    keep = torch.arange(width, device=scores.device)[None, :] < counts[:, None]
    ids = torch.where(keep, top_ids.to(torch.int32), SENTINEL).sort(dim=-1).values
    return ids, counts.to(torch.int32)


def _last_query_probs(
    q_last: torch.Tensor, k_seq: torch.Tensor, scale: float, k_len: int
) -> torch.Tensor:
    # q_last [n, Hq, D], k_seq [k_len, Hkv, D] -> probs [Hq, n, k_len] float32 (causal, softmax over keys)
    num_rows, num_q_heads, head_dim = q_last.shape
    num_kv_heads = k_seq.shape[1]
    group = num_q_heads // num_kv_heads
    qg = q_last.permute(1, 0, 2).reshape(num_kv_heads, group * num_rows, head_dim)
    scores = torch.matmul(qg, k_seq.permute(1, 2, 0)).float() * scale  # [Hkv, group * n, k_len]
    scores = scores.view(num_q_heads, num_rows, k_len)
    q_pos = torch.arange(k_len - num_rows, k_len, device=q_last.device)
    future = torch.arange(k_len, device=q_last.device)[None, :] > q_pos[:, None]
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def diagonal_sums(probs: torch.Tensor) -> torch.Tensor:
    """probs [H, n, k_len] of the LAST n queries -> [H, k_len]: sum over rows along offset d = pos_q - pos_k.

    Row i sits at position k_len - n + i, so its offset d reads key k_len - n + i - d. Flipping the keys
    turns that into column d + (n - 1 - i): a strided view with row stride (row length - 1) lines the
    offsets up without a scatter.
    """
    num_heads, num_rows, k_len = probs.shape
    padded = torch.nn.functional.pad(probs.flip(-1), (0, num_rows)).contiguous()  # [H, n, k_len + n]
    row_len = k_len + num_rows
    skewed = padded.as_strided(
        (num_heads, num_rows, k_len), (num_rows * row_len, row_len - 1, 1), storage_offset=num_rows - 1
    )
    return skewed.sum(dim=1)


def estimate_vertical_slash(
    batch: VarlenBatch,
    num_vertical: torch.Tensor,
    num_slash: torch.Tensor,
    target_mass: torch.Tensor,
    scale: float,
    *,
    head_ids: torch.Tensor | None = None,
    config: EstimateConfig = EstimateConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head vertical and slash indices -> (vertical_idx [B, H, NV], slash_idx [B, H, NS]) int32, -1 pads.

    Reads batch.q and batch.k. num_vertical, num_slash: int [H] caps; target_mass: float [H];
    H = len(head_ids) or Hq.
    """
    q, k, layout = batch.q, batch.k, batch.layout
    heads = torch.arange(q.shape[1], device=q.device) if head_ids is None else head_ids.long().to(q.device)
    verticals: list[torch.Tensor] = []
    slashes: list[torch.Tensor] = []
    for b, (q_len, k_len) in enumerate(layout.lengths):
        q_rows, k_rows = layout.q_rows(b), layout.k_rows(b)
        num_rows = min(config.last_q_len, q_len)
        if num_rows == 0:  # no new queries: nothing to attend, nothing to estimate
            verticals.append(torch.full((heads.numel(), 1), SENTINEL, dtype=torch.int32, device=q.device))
            slashes.append(torch.full((heads.numel(), 1), SENTINEL, dtype=torch.int32, device=q.device))
            continue
        column, diagonal = _vertical_slash_scores(
            q[q_rows.stop - num_rows : q_rows.stop], k[k_rows], heads, scale, k_len
        )
        pos = torch.arange(k_len, device=q.device)[None, :]
        vert_ids, _ = select_by_budget(
            column, (pos < config.num_sink_tokens).expand_as(column),
            num_vertical.to(q.device), target_mass.to(q.device),
        )
        slash_ids, _ = select_by_budget(
            diagonal, (pos < config.num_local_diagonals).expand_as(diagonal),
            num_slash.to(q.device), target_mass.to(q.device),
        )
        verticals.append(vert_ids)
        slashes.append(slash_ids)
    return _stack_padded(verticals), _stack_padded(slashes)


def _vertical_slash_scores(
    q_last: torch.Tensor, k_seq: torch.Tensor, heads: torch.Tensor, scale: float, k_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # q_last [n, Hq, D], k_seq [k_len, Hkv, D] -> column, diagonal scores [H, k_len] (mass shares)
    num_rows = q_last.shape[0]
    group = q_last.shape[1] // k_seq.shape[1]
    kv_per_chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, group * num_rows * k_len))
    columns, diagonals = [], []
    for kv_start in range(0, k_seq.shape[1], kv_per_chunk):
        kv_stop = min(kv_start + kv_per_chunk, k_seq.shape[1])
        probs = _last_query_probs(
            q_last[:, kv_start * group : kv_stop * group], k_seq[:, kv_start:kv_stop], scale, k_len
        )
        columns.append(probs.sum(dim=1) / num_rows)
        diagonals.append(diagonal_sums(probs) / num_rows)
    return torch.cat(columns)[heads], torch.cat(diagonals)[heads]


def _stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    # per-sequence [H, W_b] (SENTINEL pads) -> [B, H, max W_b] int32 with -1 pads
    width = max(r.shape[-1] for r in rows)
    out = rows[0].new_full((len(rows), rows[0].shape[0], width), -1)
    for b, r in enumerate(rows):
        out[b, :, : r.shape[-1]] = torch.where(r == SENTINEL, -1, r)
    return out


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x [length, H, D] -> [H, num_blocks, D]: the mean of each block (the last one over its real rows)."""
    length, num_heads, head_dim = x.shape
    count = num_blocks(length, block_size)
    padded = x.new_zeros(count * block_size, num_heads, head_dim)
    padded[:length] = x
    sums = padded.view(count, block_size, num_heads, head_dim).float().sum(1)  # [NB, H, D]
    sizes = torch.full((count,), float(block_size), device=x.device)
    sizes[-1] = length - (count - 1) * block_size
    return (sums / sizes[:, None, None]).permute(1, 0, 2)
