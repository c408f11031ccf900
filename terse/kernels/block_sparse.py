"""Causal varlen attention over a block-sparse index plus optional key columns (Triton).

One program computes one (query block, head, sequence): it walks the row's listed key blocks, then the
row's listed single key columns (gathered rows of K/V), folding each into one online softmax. The index
format is described in `terse.kernels.reference` (its mask builder is the definition); the converter
in `terse.kernels.vertical_slash` produces block + column rows that never overlap, so nothing is counted
twice. GQA is native: the program reads kv head = q head // group, nothing is repeated in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.checks import (
    check_block_size,
    check_index,
    check_triton_batch,
    num_blocks,
    output_for,
    resolve_head_ids,
)
from terse.kernels.tiles import attend_tile, load_kv_rows, query_tile, seq_bounds, store_rows
from terse.kernels.varlen import VarlenBatch

LOG2_E = 1.4426950408889634


@triton.jit
def _block_sparse_fwd(
    Q, K, V, Out, CuSeqlensQ, CuSeqlensK, HeadIds,
    BlockIdx, BlockCount, ColIdx, ColCount,
    qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_bb, stride_bh, stride_bm, stride_cb, stride_ch, stride_cm,
    stride_nb, stride_nh, stride_db, stride_dh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_COLS: tl.constexpr, IS_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = seq_bounds(CuSeqlensQ, CuSeqlensK, b)
    if pid_m * BLOCK_M >= q_len:
        return
    h_q = tl.load(HeadIds + h)
    q, q_pos, offs_m, offs_d, acc, m_i, l_i = query_tile(
        Q, q_start, q_len, k_len, h_q, pid_m, stride_qt, stride_qh, BLOCK_M, HEAD_DIM
    )
    h_kv = h_q // GROUP
    K_head = K + k_start * stride_kt + h_kv * stride_kh
    V_head = V + k_start * stride_vt + h_kv * stride_vh
    offs_n = tl.arange(0, BLOCK_N)

    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    row_blocks = BlockIdx + b64 * stride_bb + h64 * stride_bh + pid_m.to(tl.int64) * stride_bm
    num_row_blocks = tl.load(BlockCount + b64 * stride_nb + h64 * stride_nh + pid_m)
    for i in range(0, num_row_blocks):
        kb = tl.load(row_blocks + i)
        offs_k = kb * BLOCK_N + offs_n
        k, v = load_kv_rows(K_head, V_head, offs_k, offs_k < k_len, stride_kt, stride_vt, offs_d)
        visible = offs_k[None, :] <= q_pos[:, None]
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, IS_FP32)

    if HAS_COLS:
        row_cols = ColIdx + b64 * stride_cb + h64 * stride_ch + pid_m.to(tl.int64) * stride_cm
        num_row_cols = tl.load(ColCount + b64 * stride_db + h64 * stride_dh + pid_m)
        for c in range(0, num_row_cols, BLOCK_N):
            listed = (c + offs_n) < num_row_cols
            cols = tl.load(row_cols + c + offs_n, mask=listed, other=0)
            listed = listed & (cols >= 0) & (cols < k_len)  # never read rows outside the sequence
            k, v = load_kv_rows(K_head, V_head, cols, listed, stride_kt, stride_vt, offs_d)
            visible = listed[None, :] & (cols[None, :] <= q_pos[:, None])
            acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k, v, visible, qk_scale, IS_FP32)

    store_rows(Out, acc, l_i, q_start, offs_m, q_len, h_q, stride_ot, stride_oh, offs_d)


def kernel_config(head_dim: int, block_size_q: int) -> dict[str, int]:
    """num_warps / num_stages per tile (tuned on the H200; see docs/benchmarks.md)."""
    # H200 sweep, D=128 bf16 dense work: 64x64 w4 s3 ~390 TF/s, 128x128 w8 s3 ~380, 4 stages or 128-row
    # tiles with 4 warps ~250-285 (bench/results/sparse_prefill_tune_h200.json)
    if block_size_q >= 128:
        return {"num_warps": 8, "num_stages": 3}
    return {"num_warps": 4, "num_stages": 3}


def _check_block_index(
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    rows: tuple[int, int],
    num_q_blocks: int,
    device: torch.device,
    max_seqlen_q: int,
    block_size_q: int,
) -> None:
    check_index("block_idx", block_idx, rows, device, 4)
    check_index("block_count", block_count, rows, device, 3)
    if block_count.shape[2] < num_q_blocks or block_idx.shape[2] < num_q_blocks:
        raise KernelInputError(
            f"block index has {block_count.shape[2]} query blocks; max_seqlen_q={max_seqlen_q} needs "
            f"{num_q_blocks} at block_size_q={block_size_q}"
        )


def block_sparse_attention(
    batch: VarlenBatch,
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    scale: float,
    *,
    col_idx: torch.Tensor | None = None,
    col_count: torch.Tensor | None = None,
    block_size_q: int = 64,
    block_size_k: int = 64,
    head_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention under a block-sparse (+ columns) index -> out [total_q, Hq, D] in q's dtype.

    batch: q [total_q, Hq, D], k/v [total_k, Hkv, D]; block_idx [B, H, NQB, max_blocks], block_count
    [B, H, NQB], col_idx [B, H, NQB, max_cols], col_count [B, H, NQB] (all int32, NQB >=
    ceil(max_seqlen_q / block_size_q), H = len(head_ids) or Hq). Writes only the heads in `head_ids`
    into `out` when given (mutated in place), else into a new tensor (other heads zero).
    """
    check_triton_batch(batch)
    check_block_size("block_size_q", block_size_q)
    check_block_size("block_size_k", block_size_k)
    q, k, v, layout = batch.q, batch.k, batch.v, batch.layout
    heads = resolve_head_ids(head_ids, batch.num_q_heads, q.device)
    num_q_blocks = num_blocks(layout.max_seqlen_q, block_size_q)
    rows = (batch.num_seqs, heads.numel())
    _check_block_index(block_idx, block_count, rows, num_q_blocks, q.device, layout.max_seqlen_q, block_size_q)
    has_cols = col_idx is not None
    if has_cols != (col_count is not None):
        raise KernelInputError("pass col_idx and col_count together (or neither)")
    if col_idx is None or col_count is None:
        col_idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=q.device)
        col_count = torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)
    else:
        check_index("col_idx", col_idx, rows, q.device, 4)
        check_index("col_count", col_count, rows, q.device, 3)
    out = output_for(batch, out, head_ids)
    grid = (num_q_blocks, heads.numel(), batch.num_seqs)
    _block_sparse_fwd[grid](
        q, k, v, out, layout.cu_seqlens_q, layout.cu_seqlens_k, heads,
        block_idx, block_count, col_idx, col_count,
        scale * LOG2_E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2),
        col_idx.stride(0), col_idx.stride(1), col_idx.stride(2),
        block_count.stride(0), block_count.stride(1), col_count.stride(0), col_count.stride(1),
        GROUP=batch.group_size, HEAD_DIM=batch.head_dim, BLOCK_M=block_size_q, BLOCK_N=block_size_k,
        HAS_COLS=has_cols, IS_FP32=q.dtype == torch.float32,
        **kernel_config(batch.head_dim, block_size_q),
    )
    return out
