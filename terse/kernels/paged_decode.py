"""Triton paged-decode attention: one query per sequence over its KV blocks, split along the context.

Work split (flash-decoding / split-K): program (b, h, s) handles sequence b, KV head h (and the GROUP
query heads sharing it) and the s-th of NUM_SPLITS contiguous ranges of that sequence's tiles. A tile
is PAGES_PER_TILE pages (64 tokens at block size 16), gathered through the block table. Ranges follow
each sequence's own length and hold at least `min_tiles_per_split` tiles (MIN_TILES_PER_SPLIT by
default), so a short context uses few splits and a long one many; the splits holding tiles are the
sequence's active splits, the others return at once:

    context 400 tokens, NUM_SPLITS 64:   tiles 0..6 -> splits 0..3 active (2 tiles each), 4..63 return
    context 32K tokens, NUM_SPLITS 64:   512 tiles  -> every split active (8 tiles each)

One launch, merge included. A sequence with one active split (every sequence when NUM_SPLITS == 1)
writes its output directly, without atomics. With several, each active program writes its partial
(max, sum, weighted values) for its GROUP heads, then counts itself in at its (b, h) counter; the one
arriving last merges the partials of the active splits in split order (the same result whichever
program arrives last) and resets the counter:

    program (b, h, s), s active:  partials[b, heads, s] = (m_s, l_s, acc_s)   (plain stores)
                                  CTA barrier                                 (every thread's stores first)
                                  c = atomic_add(counters[b, h], 1)           (acquire-release)
                                  c == active - 1 ->  out = sum_s exp(m_s - m) acc_s / sum_s exp(m_s - m) l_s
                                                      (m = max_s m_s);  counters[b, h] = 0

The counters live in a per-device int32 array allocated once with zeros and never freed, so they are
zero again between launches: CUDA graph replays and later launches in stream order need no memset.
Launches sharing them must run in stream order (one engine's forward on one stream). Grid and buffer
shapes depend only on (B, table width), so the launch can be captured in a CUDA graph. Keys past a
sequence's context are never loaded (masked loads), whatever the pool holds there.
The torch reference is `terse.kernels.decode_reference.paged_decode_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_TOKENS = 64
"""Tokens per inner-loop tile (PAGES_PER_TILE pages)."""
MIN_TILES_PER_SPLIT = 2
"""Default fewest tiles a split covers (128 tokens): shorter splits cost more to merge than they save."""
MAX_SPLITS = 64


@triton.jit
def _paged_decode_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    q_ptr, kv_ptr, tables_ptr, lens_ptr, acc_ptr, m_ptr, l_ptr, counters_ptr, out_ptr,
    stride_qb, stride_qh,
    stride_kv, stride_kvblk, stride_kvtok, stride_kvh,
    stride_tb,
    stride_ab, stride_ah, stride_as,
    stride_ob, stride_oh,
    scale, num_kv_heads, min_tiles,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, PAGES_PER_TILE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
):
    TILE: tl.constexpr = PAGES_PER_TILE * BLOCK_SIZE
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(lens_ptr + b).to(tl.int32)
    num_tiles = (ctx_len + TILE - 1) // TILE
    tiles_per_split = tl.maximum((num_tiles + NUM_SPLITS - 1) // NUM_SPLITS, min_tiles)
    active_splits = (num_tiles + tiles_per_split - 1) // tiles_per_split  # the same in every program of b
    if split < active_splits:  # splits past the context touch nothing, counters included
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        heads = kvh * GROUP + offs_g
        g_mask = offs_g < GROUP
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None],
                    other=0.0)  # q: [GROUP_PAD, D]
        m_i, l_i, acc = _attend_tiles(q, kv_ptr, tables_ptr + b * stride_tb, ctx_len, kvh, tile_lo, tile_hi,
                                      stride_kv, stride_kvblk, stride_kvtok, stride_kvh, scale,
                                      GROUP_PAD, HEAD_DIM, BLOCK_SIZE, TILE, IEEE)
        out_off = b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        if active_splits == 1:
            tl.store(out_ptr + out_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        else:
            part = b * stride_ab + heads * stride_ah  # [GROUP_PAD] split 0 of each head
            tl.store(m_ptr + part + split * stride_as, m_i, mask=g_mask)
            tl.store(l_ptr + part + split * stride_as, l_i, mask=g_mask)
            tl.store(acc_ptr + (part + split * stride_as)[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=g_mask[:, None])
            # the atomic runs on one thread: the barrier orders every thread's stores before its release
            tl.debug_barrier()
            counter = counters_ptr + (b * num_kv_heads + kvh)
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")
            if arrived == active_splits - 1:
                out = _merge_partials(acc_ptr, m_ptr, l_ptr, part, stride_as, g_mask, active_splits,
                                      GROUP_PAD, HEAD_DIM)
                tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
                tl.atomic_xchg(counter, 0)


@triton.jit
def _attend_tiles(  # type: ignore[no-untyped-def]
    q, kv_ptr, table_ptr, ctx_len, kvh, tile_lo, tile_hi,
    stride_kv, stride_kvblk, stride_kvtok, stride_kvh, scale,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    IEEE: tl.constexpr,
):
    # online softmax of q [GROUP_PAD, D] over tiles [tile_lo, tile_hi): (max, sum, weighted values)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = tl.arange(0, TILE)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for tile in range(tile_lo, tile_hi):
        tok = tile * TILE + offs_t  # [TILE] positions
        valid = tok < ctx_len
        block_id = tl.load(table_ptr + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
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
    return m_i, l_i, acc


@triton.jit
def _merge_partials(  # type: ignore[no-untyped-def]
    acc_ptr, m_ptr, l_ptr, part, stride_as, g_mask, active_splits,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    # out [GROUP_PAD, D] from the partials of splits 0..active_splits-1, added in split order; the
    # loads bypass L1 (.cg): it is not kept coherent with the other multiprocessors' stores
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    for s in range(active_splits):
        m = tl.maximum(m, tl.load(m_ptr + part + s * stride_as, mask=g_mask, other=float("-inf"),
                                  cache_modifier=".cg"))
    m = tl.where(g_mask, m, 0.0)  # padding heads: no -inf - -inf
    l_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for s in range(active_splits):
        off = part + s * stride_as
        w = tl.exp(tl.load(m_ptr + off, mask=g_mask, other=float("-inf"), cache_modifier=".cg") - m)
        l_sum += w * tl.load(l_ptr + off, mask=g_mask, other=0.0, cache_modifier=".cg")
        acc += w[:, None] * tl.load(acc_ptr + off[:, None] * HEAD_DIM + offs_d[None, :], mask=g_mask[:, None],
                                    other=0.0, cache_modifier=".cg")
    return acc / tl.where(g_mask, l_sum, 1.0)[:, None]  # padding heads: no 0 / 0


# One counter array per (device, power-of-two size), allocated once and never freed: launches captured
# in CUDA graphs keep their addresses, and every launch leaves its counters at zero.
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def split_counters(device: torch.device, num_counters: int) -> torch.Tensor:
    """int32 [>= num_counters] on `device`, zero between launches: the arrival counters of (sequence,
    KV head) pairs, shared by every launch with at most that many pairs."""
    size = 1 << max(num_counters - 1, 0).bit_length()
    counters = _COUNTERS.get((device, size))
    if counters is None:
        counters = _COUNTERS[(device, size)] = torch.zeros(size, dtype=torch.int32, device=device)
    return counters


def check_min_tiles(min_tiles_per_split: int | None) -> int:
    """`min_tiles_per_split`, MIN_TILES_PER_SPLIT for None; a ValueError unless it is an int >= 1."""
    if min_tiles_per_split is None:
        return MIN_TILES_PER_SPLIT
    if isinstance(min_tiles_per_split, bool) or not isinstance(min_tiles_per_split, int) or min_tiles_per_split < 1:
        raise ValueError(f"min_tiles_per_split={min_tiles_per_split!r}: pass an int >= 1 (tiles of {TILE_TOKENS} "
                         f"tokens) or None for the default {MIN_TILES_PER_SPLIT}")
    return min_tiles_per_split


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, table_width: int, block_size: int, device: torch.device,
    min_tiles_per_split: int | None = None,
) -> int:
    """Splits per (sequence, KV head): enough programs for about two per multiprocessor, a power of two
    (few compiled variants), at most the splits of `min_tiles_per_split` tiles a full table holds."""
    min_tiles = check_min_tiles(min_tiles_per_split)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = -(-2 * sms // (num_seqs * num_kv_heads))
    splits = 1 << max(0, (wanted - 1).bit_length())
    max_tiles = -(-table_width * block_size // TILE_TOKENS)
    return max(1, min(splits, MAX_SPLITS, -(-max_tiles // min_tiles)))


def paged_decode_triton(
    q: torch.Tensor, layer_kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    num_splits: int | None = None, min_tiles_per_split: int | None = None,
) -> torch.Tensor:
    """q: [B, H, D]; layer_kv: [2, NB, bs, KVH, D] (contiguous); block_tables: [B, W] int; context_lens:
    [B] int (>= 1). Returns [B, H, D] in q's dtype. `num_splits` None: `choose_num_splits`;
    `min_tiles_per_split` (int >= 1) None: MIN_TILES_PER_SPLIT."""
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
    min_tiles = check_min_tiles(min_tiles_per_split)
    group = num_heads // num_kv_heads
    width = block_tables.shape[1]
    if num_splits is None:  # positional: bench/engine_variants.py wraps it
        num_splits = choose_num_splits(num_seqs, num_kv_heads, width, block_size, q.device, min_tiles)
    num_splits = max(1, num_splits)
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=q.dtype, device=q.device)
    # partials: [B, H, S] for m and l, [B, H, S, D] for acc (float32); unused with one split
    parts = num_splits if num_splits > 1 else 1
    m = torch.empty(num_seqs, num_heads, parts, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(num_seqs, num_heads, parts, head_dim, dtype=torch.float32, device=q.device)
    counters = split_counters(q.device, num_seqs * num_kv_heads)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, layer_kv, block_tables, context_lens, acc, m, l_sum, counters, out,
        q.stride(0), q.stride(1),
        layer_kv.stride(0), layer_kv.stride(1), layer_kv.stride(2), layer_kv.stride(3),
        block_tables.stride(0),
        m.stride(0), m.stride(1), m.stride(2),
        out.stride(0), out.stride(1),
        head_dim**-0.5, num_kv_heads, min_tiles,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, PAGES_PER_TILE=max(1, TILE_TOKENS // block_size), NUM_SPLITS=num_splits,
        IEEE=q.dtype == torch.float32,
    )
    return out
