"""Online block-sparse index estimation from mean-pooled query and key blocks.

For query block m (absolute positions first_q .. last_q) and key block n, the pooled score is
mean(q block m) . mean(k block n) * scale; key blocks past last_q are masked, the rest softmax-normalized
per query block, so each score is an estimated share of the block row's attention mass. Key block 0
(sinks) and the blocks holding the row's own diagonal are always kept, so no query is left without a key.
"""

from __future__ import annotations

import torch

from terse.kernels.checks import num_blocks
from terse.kernels.estimate import MAX_CHUNK_ELEMENTS, pool_blocks, select_by_budget
from terse.kernels.varlen import VarlenBatch
from terse.kernels.vertical_slash import SENTINEL


def _block_rows(
    pooled_q: torch.Tensor,
    pooled_k: torch.Tensor,
    first_q: torch.Tensor,
    last_q: torch.Tensor,
    caps: torch.Tensor,
    target_mass: torch.Tensor,
    scale: float,
    block_size_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # pooled_q [h, R, D], pooled_k [h, NKB, D], first_q/last_q [R] -> ids [h, R, W], counts [h, R]
    num_heads, num_rows = pooled_q.shape[:2]
    num_k_blocks = pooled_k.shape[1]
    scores = torch.matmul(pooled_q, pooled_k.transpose(1, 2)) * scale  # [h, R, NKB]
    n = torch.arange(num_k_blocks, device=scores.device)[None, :]
    future = n * block_size_k > last_q[:, None]  # [R, NKB]
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    diagonal = (n >= (first_q // block_size_k)[:, None]) & (n <= (last_q // block_size_k)[:, None])
    forced = ((n == 0) | diagonal).expand(num_heads, -1, -1)
    ids, counts = select_by_budget(
        probs.reshape(num_heads * num_rows, num_k_blocks),
        forced.reshape(num_heads * num_rows, num_k_blocks),
        caps.repeat_interleave(num_rows),
        target_mass.repeat_interleave(num_rows),
    )
    return ids.view(num_heads, num_rows, -1), counts.view(num_heads, num_rows)


def estimate_block_sparse(
    batch: VarlenBatch,
    num_blocks_per_row: torch.Tensor,
    target_mass: torch.Tensor,
    scale: float,
    *,
    block_size_q: int = 64,
    block_size_k: int = 64,
    head_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head block index -> (block_idx [B, H, NQB, W] int32 ascending, SENTINEL pads; block_count [B, H, NQB]).

    Reads batch.q and batch.k. num_blocks_per_row: int [H] caps of key blocks per query block;
    target_mass: float [H]. NQB covers max_seqlen_q; rows past a sequence's end have count 0.
    """
    q, k, layout = batch.q, batch.k, batch.layout
    device = q.device
    heads = torch.arange(q.shape[1], device=device) if head_ids is None else head_ids.long().to(device)
    caps, masses = num_blocks_per_row.to(device), target_mass.to(device)
    max_q_blocks = num_blocks(layout.max_seqlen_q, block_size_q)
    per_seq: list[tuple[torch.Tensor, torch.Tensor]] = []
    for b, (q_len, k_len) in enumerate(layout.lengths):
        if q_len == 0:
            per_seq.append((torch.full((heads.numel(), 0, 1), SENTINEL, dtype=torch.int32, device=device),
                            torch.zeros(heads.numel(), 0, dtype=torch.int32, device=device)))
            continue
        pooled_q = pool_blocks(q[layout.q_rows(b)], block_size_q)[heads]  # [H, NQB_b, D]
        pooled_k = pool_blocks(k[layout.k_rows(b)], block_size_k)[heads // batch.group_size]
        m = torch.arange(pooled_q.shape[1], device=device)
        first_q = k_len - q_len + m * block_size_q
        last_q = k_len - q_len + torch.clamp((m + 1) * block_size_q, max=q_len) - 1
        rows_per_chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, heads.numel() * pooled_k.shape[1]))
        parts = [
            _block_rows(
                pooled_q[:, r : r + rows_per_chunk], pooled_k, first_q[r : r + rows_per_chunk],
                last_q[r : r + rows_per_chunk], caps, masses, scale, block_size_k,
            )
            for r in range(0, pooled_q.shape[1], rows_per_chunk)
        ]
        width = max(p[0].shape[-1] for p in parts)
        ids = torch.cat([_pad_width(p[0], width) for p in parts], dim=1)
        per_seq.append((ids, torch.cat([p[1] for p in parts], dim=1)))
    width = max(ids.shape[-1] for ids, _ in per_seq)
    block_idx = torch.full((batch.num_seqs, heads.numel(), max_q_blocks, width), SENTINEL,
                           dtype=torch.int32, device=device)
    block_count = torch.zeros(batch.num_seqs, heads.numel(), max_q_blocks, dtype=torch.int32, device=device)
    for b, (ids, counts) in enumerate(per_seq):
        block_idx[b, :, : ids.shape[1], : ids.shape[2]] = ids
        block_count[b, :, : counts.shape[1]] = counts
    return block_idx, block_count


def _pad_width(ids: torch.Tensor, width: int) -> torch.Tensor:
    if ids.shape[-1] == width:
        return ids
    return torch.nn.functional.pad(ids, (0, width - ids.shape[-1]), value=SENTINEL)
