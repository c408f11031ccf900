"""Triton paged-decode attention: one query per sequence over its KV blocks, split along the context.

Work split (flash-decoding / split-K): program (b, h, s) handles sequence b, KV head h (and the GROUP
query heads sharing it) and the s-th of NUM_SPLITS contiguous ranges of that sequence's tiles. A tile
is PAGES_PER_TILE pages (64 tokens at block size 16), gathered through the block table. Ranges follow
each sequence's own length and hold at least MIN_TILES_PER_SPLIT tiles, so a short context uses few
splits and a long one many:

    context 400 tokens, NUM_SPLITS 64:   tiles 0..6 -> splits 0..6 busy (1 tile each), 7..63 empty
    context 32K tokens, NUM_SPLITS 64:   512 tiles  -> every split busy (8 tiles each)

A program whose range is at most a couple of tiles (many splits: small batches) runs its loop without
software pipelining, which only delays the first tile there; one that walks many tiles (large batches,
few splits) keeps the loads of the next tiles in flight (STAGES).

With NUM_SPLITS > 1 each program writes a partial (max, sum, weighted values) and a second small kernel
merges the splits:

    out = sum_s exp(m_s - m) * acc_s / sum_s exp(m_s - m) * l_s,   m = max_s m_s

With NUM_SPLITS == 1 (large batches fill the GPU without splitting) the one program writes the output
itself. Grid and buffer shapes depend only on (B, table width), so the launch can be captured in a CUDA
graph. Keys past a sequence's context are never loaded (masked loads), whatever the pool holds there.
The torch reference is `terse.kernels.decode_reference.paged_decode_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.kernels.dependent_launch import launch_options, wait_for_previous_kernel
from terse.validation import check_int

TILE_TOKENS = 64
"""Tokens per inner-loop tile (PAGES_PER_TILE pages)."""
MIN_TILES_PER_SPLIT = 1
"""A split covers at least this many tiles. One: on an H200 (batch 1, 8 KV heads, contexts 130-4000
tokens) splits of one tile plus the merge ran in 5.7-8.5 us, splits of two in 7.8-9.5 us
(bench/decode_profile.py)."""
MAX_SPLITS = 64


@triton.jit
def _paged_decode_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    q_ptr, kv_ptr, tables_ptr, lens_ptr, acc_ptr, m_ptr, l_ptr, out_ptr,
    stride_qb, stride_qh,
    stride_kv, stride_kvblk, stride_kvtok, stride_kvh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_ob, stride_oh,
    scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGES_PER_TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    MIN_TILES: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    TILE: tl.constexpr = PAGES_PER_TILE * BLOCK_SIZE
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(lens_ptr + b).to(tl.int32)
    num_tiles = (ctx_len + TILE - 1) // TILE
    tiles_per_split = tl.maximum((num_tiles + NUM_SPLITS - 1) // NUM_SPLITS, MIN_TILES)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, TILE)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    # q: [GROUP_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for tile in tl.range(tile_lo, tile_hi, num_stages=STAGES):
        tok = tile * TILE + offs_t  # [TILE] positions
        valid = tok < ctx_len
        block_id = tl.load(tables_ptr + b * stride_tb + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block_id * stride_kvblk + (tok % BLOCK_SIZE) * stride_kvtok + kvh * stride_kvh  # [TILE]
        k = tl.load(kv_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # [TILE, D]
        v = tl.load(kv_ptr + stride_kv + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:  # float32 pools: full-precision dots (the default would round operands to tf32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GROUP_PAD, TILE]
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        out_off = b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = b * stride_ab + heads * stride_ah + split * stride_as
        tl.store(m_ptr + part, m_i, mask=g_mask)
        tl.store(l_ptr + part, l_i, mask=g_mask)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None])


@triton.jit
def _merge_splits_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    acc_ptr, m_ptr, l_ptr, out_ptr,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)  # one (sequence, head)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    m = tl.load(m_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    l_sum = tl.load(l_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    acc = tl.load(acc_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_mask[:, None], other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # empty splits: exp(-inf) = 0
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_sum * w, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, table_width: int, block_size: int, device: torch.device,
    min_tiles_per_split: int = MIN_TILES_PER_SPLIT,
) -> int:
    """Splits per (sequence, KV head): enough programs for about two per multiprocessor, a power of two
    (few compiled variants), at most the splits of `min_tiles_per_split` tiles a full table holds."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = -(-2 * sms // (num_seqs * num_kv_heads))
    splits = 1 << max(0, (wanted - 1).bit_length())
    max_tiles = -(-table_width * block_size // TILE_TOKENS)
    return max(1, min(splits, MAX_SPLITS, -(-max_tiles // min_tiles_per_split)))


def pipeline_stages(table_width: int, block_size: int, num_splits: int) -> int:
    """Software-pipeline stages of the tile loop: none (1) where a split of a full table walks at most two
    tiles, else 3 (the next tiles' loads in flight)."""
    return 1 if -(-table_width * block_size // TILE_TOKENS) <= 2 * num_splits else 3


def paged_decode_triton(
    q: torch.Tensor, layer_kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    num_splits: int | None = None, *, min_tiles_per_split: int = MIN_TILES_PER_SPLIT, num_stages: int | None = None,
) -> torch.Tensor:
    """q: [B, H, D]; layer_kv: [2, NB, bs, KVH, D] (contiguous); block_tables: [B, W] int; context_lens:
    [B] int (>= 1). Returns [B, H, D] in q's dtype. `num_splits` None: `choose_num_splits`;
    `num_stages` None: `pipeline_stages` (both tunables are for benchmarks: bench/decode_profile.py)."""
    check_int("min_tiles_per_split", min_tiles_per_split, low=1, example=MIN_TILES_PER_SPLIT, error=ValueError)
    if num_stages is not None:
        check_int("num_stages", num_stages, low=1, high=4, example=3, error=ValueError)
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, kv_dim = layer_kv.shape
    if kv_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q heads {tuple(q.shape[1:])} do not fit the pool's (KVH={num_kv_heads}, D={kv_dim})")
    if q.stride(-1) != 1 or not layer_kv.is_contiguous() or block_tables.stride(-1) != 1:
        raise ValueError("q rows, block table rows and the KV pool must be contiguous")
    if block_size < 16 or head_dim < 16 or head_dim & (head_dim - 1) or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size}, head_dim={head_dim}: both must be powers of two >= 16")
    if q.dtype != layer_kv.dtype:
        raise ValueError(f"q is {q.dtype} but the pool is {layer_kv.dtype}")
    group = num_heads // num_kv_heads
    width = block_tables.shape[1]
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, width, block_size, q.device, min_tiles_per_split)
    num_splits = max(1, num_splits)
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    # partials: [B, H, S] for m and l, [B, H, S, D] for acc (float32); unused with one split
    parts = num_splits if num_splits > 1 else 1
    m = torch.empty(num_seqs, num_heads, parts, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(num_seqs, num_heads, parts, head_dim, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, layer_kv, block_tables, context_lens, acc, m, l_sum, out,
        q.stride(0), q.stride(1),
        layer_kv.stride(0), layer_kv.stride(1), layer_kv.stride(2), layer_kv.stride(3),
        block_tables.stride(0),
        m.stride(0), m.stride(1), m.stride(2),
        out.stride(0), out.stride(1),
        head_dim**-0.5,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, PAGES_PER_TILE=max(1, TILE_TOKENS // block_size), NUM_SPLITS=num_splits,
        MIN_TILES=min_tiles_per_split, IEEE=q.dtype == torch.float32,
        STAGES=pipeline_stages(width, block_size, num_splits) if num_stages is None else num_stages,
        **launch_options(q),
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs * num_heads,)](
            acc, m, l_sum, out, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, **launch_options(q),
        )
    return out
