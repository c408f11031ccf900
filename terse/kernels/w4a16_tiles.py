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
  PAIRED: the tile's columns are gate columns and the matching up columns of a fused gate/up
  projection ([gate | up], N = 2I wide); what is stored is silu(gate) * up, I wide, rounded as
  `silu_mul_triton` rounds after the product: one launch where there were two.
- `row_launch` / `whole_steps_per_split`: the grid, K slices and buffers of a one-row GEMV launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from terse.kernels.activation import silu_times
from terse.kernels.row_prep_kernels import store_prep
from terse.kernels.w4a16_layout import Int4Weight


@triton.jit
def store_tile(
    acc, Out, Bias, WS, Locks, offs_m, offs_n, M, N, stride_om, tile_id, pid_k, split_k,
    HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAIRED: tl.constexpr, OutXP, OutSP, PREP_OUT: tl.constexpr,
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
            _store_out(total, Out, Bias, offs_m, offs_n, M, N, stride_om, HAS_BIAS, PAIRED, BLOCK_M, BLOCK_N,
                       OutXP, OutSP, PREP_OUT)
            tl.atomic_xchg(Locks + tile_id, 0)
    else:
        _store_out(acc, Out, Bias, offs_m, offs_n, M, N, stride_om, HAS_BIAS, PAIRED, BLOCK_M, BLOCK_N, OutXP, OutSP,
                   PREP_OUT)


@triton.jit
def store_row(
    acc, Out, Bias, WS, Locks, offs_n, N, pid_n, pid_k, split_k,
    HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, PAIRED: tl.constexpr,
    OutXP, OutSP, PREP_OUT: tl.constexpr,
):
    # acc: [BLOCK_N] float32, a one-row GEMV program's partial sum: `store_tile` with M = 1
    store_tile(acc[None, :], Out, Bias, WS, Locks, tl.arange(0, 1), offs_n, 1, N, N, pid_n, pid_k, split_k,
               HAS_BIAS, USE_SPLIT, 1, BLOCK_N, PAIRED, OutXP, OutSP, PREP_OUT)


@triton.jit
def _store_out(acc, Out, Bias, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr, PAIRED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OutXP, OutSP, PREP_OUT: tl.constexpr):
    if PAIRED:
        _store_silu_mul(acc, Out, Bias, offs_m, offs_n, M, N // 2, stride_om, HAS_BIAS, BLOCK_M, BLOCK_N // 2,
                        OutXP, OutSP, PREP_OUT)
    else:
        n_mask = offs_n < N
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])


@triton.jit
def _store_silu_mul(acc, Out, Bias, offs_m, offs_n, M, I, stride_om, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                    HALF: tl.constexpr, OutXP, OutSP, PREP_OUT: tl.constexpr):
    # acc [BLOCK_M, 2 HALF]: HALF gate columns then the HALF up columns I further; offs_n alike
    gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), (0, 2, 1)))  # [BLOCK_M, HALF] each
    gate_n, up_n = tl.split(tl.permute(tl.reshape(offs_n, [2, HALF]), (1, 0)))  # [HALF]: up_n = I + gate_n
    n_mask = gate_n < I
    if HAS_BIAS:
        gate += tl.load(Bias + gate_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        up += tl.load(Bias + up_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    dtype = Out.dtype.element_ty
    out = silu_times(gate.to(dtype), up.to(dtype))  # the product rounded as the unfused path stores it
    ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + gate_n[None, :]
    tl.store(ptrs, out, mask=(offs_m < M)[:, None] & n_mask[None, :])
    if PREP_OUT:  # one row: the down product's input side (row_prep), per packed row of the HALF outputs
        store_prep(tl.reshape(out.to(tl.float32), [HALF]), gate_n, I, OutXP, OutSP, HALF // 8, 8)



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


def row_launch(x: torch.Tensor, weight: Int4Weight, block_n: int, k_per_split: int, *, paired: bool = False) -> RowLaunch:
    """Grid, split count and buffers of a one-row GEMV over `weight` slicing K every `k_per_split` rows;
    `paired`: a block holds block_n / 2 gate and as many up columns, the output is N / 2 wide."""
    n, k = weight.out_features, weight.in_features
    width = n // 2 if paired else n
    num_n = triton.cdiv(width, block_n // 2 if paired else block_n)
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(1, width, dtype=x.dtype, device=x.device)
    workspace, locks = split_k_buffers(x.device, num_n * split_k * block_n if split_k > 1 else 1)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    return RowLaunch((num_n, split_k), split_k, out, workspace, locks, zeros)


def whole_steps_per_split(k: int, step: int, split_k: int, num_n: int) -> int:
    """K per slice for about `split_k` slices of whole steps of `step` rows (one slice when the column
    blocks alone exceed the lock array)."""
    steps = triton.cdiv(k, step)
    split_k = max(1, min(split_k, steps)) if num_n <= MAX_SPLIT_TILES else 1
    return triton.cdiv(steps, split_k) * step
