"""Vertical-slash attention: chosen key columns + chosen diagonals, converted on the device into
per-query-block key-block lists and column lists, then computed by the block-sparse kernel.

Conversion (torch ops on the index's device, no Python loop over blocks; heads are processed in chunks
only to bound memory). For query block m with absolute positions first_q .. last_q, diagonal d covers
keys max(first_q - d, 0) .. last_q - d, i.e. key blocks lo // bs_k .. hi // bs_k (at most
(bs_q - 1) // bs_k + 2 of them):

    d = 5, bs_q = bs_k = 4, query block 2 (abs 8..11) -> keys 3..6 -> key blocks 0 and 1
    keys   0 1 2 3 | 4 5 6 7 | 8 ...
                 ^ . . ^           <- diagonal keys; both blocks are listed (whole blocks computed)

All candidates of a row are sorted and deduplicated, so overlapping diagonals give one block. A column
that falls inside a listed block of the row is dropped from that row's column list (the block already
holds it): the kernel never counts a key twice. Columns after the row's last query are dropped too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from terse.errors import KernelInputError
from terse.kernels.checks import check_block_size, num_blocks
from terse.kernels.varlen import VarlenBatch, VarlenLayout

SENTINEL = 1 << 30  # sorts after every real block/column id
MAX_CHUNK_ELEMENTS = 1 << 27  # candidate elements per head chunk (~0.5 GiB of int32)


class VerticalSlashIndex(NamedTuple):
    """Block-sparse rows + column rows, the input of `block_sparse_attention`."""

    block_idx: torch.Tensor  # [B, H, NQB, max_blocks] int32, ascending, padded with SENTINEL
    block_count: torch.Tensor  # [B, H, NQB] int32
    col_idx: torch.Tensor  # [B, H, NQB, max_cols] int32, ascending, padded with SENTINEL
    col_count: torch.Tensor  # [B, H, NQB] int32


def _sorted_unique_rows(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per last-dim row: the kept values, ascending and distinct, first; SENTINEL after. -> (rows, counts)."""
    rows = torch.where(keep, values, SENTINEL).sort(dim=-1).values
    if rows.shape[-1] > 1:
        dup = rows[..., 1:] == rows[..., :-1]
        rows[..., 1:] = rows[..., 1:].masked_fill(dup, SENTINEL)
        rows = rows.sort(dim=-1).values
    counts = (rows < SENTINEL).sum(dim=-1, dtype=torch.int32)
    return rows, counts


def _trim(rows: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
    width = max(width, 1)
    if rows.shape[-1] >= width:
        return rows[..., :width]
    pad = rows.new_full((*rows.shape[:-1], width - rows.shape[-1]), SENTINEL)
    return torch.cat([rows, pad], dim=-1)


def _compact(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per last-dim row: the kept values in their order, first; SENTINEL after. -> (rows, counts).

    A cumulative sum gives each kept value its slot (O(n), unlike a sort); trimmed to the longest row.
    """
    counts = keep.sum(dim=-1, dtype=torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    slot = torch.where(keep, torch.cumsum(keep, dim=-1) - 1, width)  # non-kept -> a spill column
    rows = values.new_full((*values.shape[:-1], width + 1), SENTINEL)
    rows.scatter_(-1, slot, values)
    return rows[..., :width].contiguous(), counts


def _convert_chunk(
    vertical_idx: torch.Tensor,
    slash_idx: torch.Tensor,
    q_lens: torch.Tensor,
    k_lens: torch.Tensor,
    num_q_blocks: int,
    block_size_q: int,
    block_size_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    device = slash_idx.device
    m = torch.arange(num_q_blocks, device=device)
    offset = (k_lens - q_lens)[:, None]  # [B, 1]
    first_q = offset + m * block_size_q  # [B, NQB]
    row_end = torch.minimum((m + 1) * block_size_q, q_lens[:, None])
    last_q = offset + row_end - 1  # [B, NQB]
    row_valid = (m * block_size_q)[None, :] < q_lens[:, None]  # [B, NQB]

    # diagonals -> candidate key blocks [B, H, NQB, NS * span]. With the offsets in descending order each
    # diagonal's block range starts at or after the previous one's start, and each range is contiguous,
    # so a running maximum turns the candidates into a sorted list in which repeats sit side by side.
    d = slash_idx.sort(dim=-1, descending=True).values.long()[:, :, None, :]  # [B, H, 1, NS]
    d_valid = (d >= 0) & (d < k_lens[:, None, None, None])
    lo = torch.clamp(first_q[:, None, :, None] - d, min=0)
    hi = last_q[:, None, :, None] - d
    valid = d_valid & (hi >= 0) & row_valid[:, None, :, None]
    span = (block_size_q - 1) // block_size_k + 2
    cand = (lo // block_size_k)[..., None] + torch.arange(span, device=device)
    cand_valid = valid[..., None] & (cand <= (hi // block_size_k)[..., None])
    ordered = torch.where(cand_valid, cand, -1).flatten(-2).to(torch.int32).cummax(dim=-1).values
    previous = torch.nn.functional.pad(ordered[..., :-1], (1, 0), value=-1)
    block_rows, block_count = _compact(ordered, (ordered >= 0) & (ordered != previous))

    # columns: distinct per head, then per row: causal-reachable and not inside a listed block
    cols, _ = _sorted_unique_rows(
        vertical_idx, (vertical_idx >= 0) & (vertical_idx < k_lens[:, None, None].to(torch.int32))
    )  # [B, H, NV], ascending
    cols_b = cols[:, :, None, :].expand(-1, -1, num_q_blocks, -1)  # [B, H, NQB, NV]
    col_blocks = (cols_b // block_size_k).contiguous()
    pos = torch.searchsorted(block_rows, col_blocks).clamp(max=block_rows.shape[-1] - 1)
    in_block = torch.gather(block_rows, -1, pos) == col_blocks
    keep = (cols_b < SENTINEL) & (cols_b <= last_q[:, None, :, None]) & ~in_block
    keep &= row_valid[:, None, :, None]
    col_rows, col_count = _compact(cols_b.contiguous(), keep)
    return block_rows, block_count, col_rows, col_count


def convert_vertical_slash(
    vertical_idx: torch.Tensor,
    slash_idx: torch.Tensor,
    layout: VarlenLayout,
    *,
    block_size_q: int = 64,
    block_size_k: int = 64,
) -> VerticalSlashIndex:
    """vertical_idx [B, H, NV], slash_idx [B, H, NS] (int32, -1 pads) -> VerticalSlashIndex on their device.

    Widths are trimmed to the longest row (one device-to-host read of the maxima).
    """
    check_block_size("block_size_q", block_size_q)
    check_block_size("block_size_k", block_size_k)
    for name, t in (("vertical_idx", vertical_idx), ("slash_idx", slash_idx)):
        if t.dtype != torch.int32 or t.dim() != 3 or t.shape[:2] != vertical_idx.shape[:2]:
            raise KernelInputError(
                f"{name} is {t.dtype} of shape {tuple(t.shape)}; expected int32 [num_seqs, heads, n] "
                "with the same (num_seqs, heads) for vertical_idx and slash_idx"
            )
    if vertical_idx.shape[0] != layout.num_seqs:
        raise KernelInputError(
            f"index covers {vertical_idx.shape[0]} sequences but the layout has {layout.num_seqs}"
        )
    q_lens, k_lens = layout.device_lengths()
    num_q_blocks = num_blocks(layout.max_seqlen_q, block_size_q)
    num_seqs, num_heads = vertical_idx.shape[:2]
    span = (block_size_q - 1) // block_size_k + 2
    per_head = num_seqs * num_q_blocks * max(slash_idx.shape[2] * span, vertical_idx.shape[2], 1)
    heads_per_chunk = max(1, MAX_CHUNK_ELEMENTS // per_head)
    parts = [
        _convert_chunk(
            vertical_idx[:, h : h + heads_per_chunk],
            slash_idx[:, h : h + heads_per_chunk],
            q_lens, k_lens, num_q_blocks, block_size_q, block_size_k,
        )
        for h in range(0, num_heads, heads_per_chunk)
    ]
    block_counts = torch.cat([p[1] for p in parts], dim=1)
    col_counts = torch.cat([p[3] for p in parts], dim=1)
    max_blocks = int(block_counts.max()) if block_counts.numel() else 0
    max_cols = int(col_counts.max()) if col_counts.numel() else 0
    block_idx = torch.cat([_trim(p[0], p[1], max_blocks) for p in parts], dim=1).contiguous()
    col_idx = torch.cat([_trim(p[2], p[3], max_cols) for p in parts], dim=1).contiguous()
    return VerticalSlashIndex(block_idx, block_counts.contiguous(), col_idx, col_counts.contiguous())


def vertical_slash_attention(
    batch: VarlenBatch,
    vertical_idx: torch.Tensor,
    slash_idx: torch.Tensor,
    scale: float,
    *,
    block_size_q: int = 64,
    block_size_k: int = 64,
    head_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention under a vertical-slash index (format in `terse.kernels.reference`) -> [total_q, Hq, D]."""
    from terse.kernels.block_sparse import block_sparse_attention

    index = convert_vertical_slash(
        vertical_idx, slash_idx, batch.layout, block_size_q=block_size_q, block_size_k=block_size_k
    )
    return block_sparse_attention(
        batch, index.block_idx, index.block_count, scale,
        col_idx=index.col_idx, col_count=index.col_count,
        block_size_q=block_size_q, block_size_k=block_size_k, head_ids=head_ids, out=out,
    )
