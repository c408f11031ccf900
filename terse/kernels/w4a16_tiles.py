"""Triton output side of the W4A16 kernels (imports triton: load only where it exists); the input side
(packed weights -> scaled float tiles) is in `w4a16_dequant.py`.

- `store_tile`: writes a [BLOCK_M, BLOCK_N] float32 accumulator (+ bias) to the output, directly or,
  under split-K, through a workspace where the last of the split_k programs of the tile adds the
  partial sums in a fixed order (deterministic) and resets the tile's arrival counter:

      program (tile t, split s):  partials[t, s] = acc        (plain stores)
                                  c = atomic_add(locks[t], 1) (acquire-release)
                                  c == SPLIT_K - 1 ->  out = sum_s partials[t, s]; locks[t] = 0

  One launch per product (no reduction kernel, no memset): the counters reset themselves, so the
  same workspace serves every later launch in stream order, CUDA graph replays included.
- `row_launch` / `whole_steps_per_split`: the grid, K slices and buffers of a one-row GEMV launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from terse.kernels.w4a16_layout import Int4Weight


@triton.jit
def store_tile(
    acc, Out, Bias, WS, Locks, offs_m, offs_n, M, N, stride_om, tile_id, pid_k, split_k,
    HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # acc: [BLOCK_M, BLOCK_N] float32, this program's partial sum over its K range; split_k programs
    # share the tile (a runtime count: one compiled kernel serves every split)
    if USE_SPLIT:
        tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        rows = (offs_m < M)[:, None]  # rows past M (padding of a skinny product) are never written or read
        base = WS + tile_id.to(tl.int64) * (split_k * BLOCK_M * BLOCK_N)
        tl.store(base + pid_k * (BLOCK_M * BLOCK_N) + tile, acc, mask=rows)
        arrived = tl.atomic_add(Locks + tile_id, 1, sem="acq_rel")
        if arrived == split_k - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(split_k):
                total += tl.load(base + s * (BLOCK_M * BLOCK_N) + tile, mask=rows, other=0.0, cache_modifier=".cg")
            _store_out(total, Out, Bias, offs_m, offs_n, M, N, stride_om, HAS_BIAS)
            tl.atomic_xchg(Locks + tile_id, 0)
    else:
        _store_out(acc, Out, Bias, offs_m, offs_n, M, N, stride_om, HAS_BIAS)


@triton.jit
def store_row(
    acc, Out, Bias, WS, Locks, offs_n, N, pid_n, pid_k, split_k,
    HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # acc: [BLOCK_N] float32, a one-row GEMV program's partial sum: `store_tile` with M = 1
    store_tile(acc[None, :], Out, Bias, WS, Locks, tl.arange(0, 1), offs_n, 1, N, N, pid_n, pid_k, split_k,
               HAS_BIAS, USE_SPLIT, 1, BLOCK_N)


@triton.jit
def _store_out(acc, Out, Bias, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr):
    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])



# -- split-K workspace (torch side) ----------------------------------------------------------------
# One lock array and a few partial-sum buffers per device, allocated once and never freed: launches
# captured in CUDA graphs keep their addresses. Launches that share them must run in stream order
# (one engine's forward on one stream), which is how the engine runs its layers.
_LOCKS: dict[torch.device, torch.Tensor] = {}
_WORKSPACES: dict[tuple[torch.device, int], torch.Tensor] = {}
MAX_SPLIT_TILES = 1 << 16
"""Most output tiles a split-K launch may have (the size of the per-device lock array)."""


def split_k_buffers(device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace float32 [>= numel], locks int32 [MAX_SPLIT_TILES], zero between launches) on `device`."""
    locks = _LOCKS.get(device)
    if locks is None:
        locks = _LOCKS[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    size = 1 << max(numel - 1, 1).bit_length()  # power-of-two sizes: few buffers, each reused
    workspace = _WORKSPACES.get((device, size))
    if workspace is None:
        workspace = _WORKSPACES[(device, size)] = torch.empty(size, dtype=torch.float32, device=device)
    return workspace, locks


# -- one-row launches (the GEMVs) ----------------------------------------------------------------------
class RowLaunch(NamedTuple):
    """What a one-row GEMV launch needs besides its kernel's own constants."""

    grid: tuple[int, int]
    """(column blocks, K slices)."""
    split_k: int
    """K slices (no empty ones)."""
    out: torch.Tensor
    """[1, N] in x's dtype."""
    workspace: torch.Tensor
    locks: torch.Tensor
    zeros: torch.Tensor
    """The weight's zeros, or its scales as a stand-in the kernel does not read (HAS_ZEROS False)."""


def row_launch(x: torch.Tensor, weight: Int4Weight, block_n: int, k_per_split: int) -> RowLaunch:
    """Grid, split count and buffers of a one-row GEMV over `weight` slicing K every `k_per_split` rows."""
    n, k = weight.out_features, weight.in_features
    num_n = triton.cdiv(n, block_n)
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    workspace, locks = split_k_buffers(x.device, num_n * split_k * block_n if split_k > 1 else 1)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    return RowLaunch((num_n, split_k), split_k, out, workspace, locks, zeros)


def whole_steps_per_split(k: int, step: int, split_k: int, num_n: int) -> int:
    """K per slice for about `split_k` slices of whole steps of `step` rows (one slice when the column
    blocks alone exceed the lock array)."""
    steps = triton.cdiv(k, step)
    split_k = max(1, min(split_k, steps)) if num_n <= MAX_SPLIT_TILES else 1
    return triton.cdiv(steps, split_k) * step
