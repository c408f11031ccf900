"""The fused q/k/v projection of one 16-bit row with RoPE and the KV write in its store: the column GEMV
(`w4a16_gemv_column`) whose programs each hold matching halves of heads, so the store can rotate them
and write q, k and v where `rope_store_triton` would: one launch where there were two.

The weight is [K, (H + 2 KVH) D] = [q heads | k heads | v heads], D = 2 HALF. A program's BLOCK_N columns
are BLOCK_N / 2 columns of one head's first half and the matching ones HALF further:

    head h:   [ d0 .. d0 + B/2 | ... ]  [ d0 + HALF .. d0 + HALF + B/2 | ... ]
                 first half (x1)            second half (x2)

Its store rounds the products to the activation dtype (as the plain product stores them), then for a q
or k head writes [x1 cos - x2 sin | x2 cos + x1 sin] with `rope_store_triton`'s rounding (cos and sin
looked up at the row's position), k also into the KV pool at the row's slot; a v head is written as is
to the pool and to v. Under the interpreter, bit for bit what the product followed by `rope_store_triton`
gives. Compiled for CUDA, q/k/v products and v are still identical, but the compiler contracts each
rotated half's multiply and add into one bfloat16 FMA (the product's rounding skipped), and it picks the
product to fuse per kernel, so rotated q and k may differ from `rope_store_triton`'s in the last bit of a
rounding: on an H200 at the 8B shape, 11-17% of q/k values, at most 1.6e-2 apart, with a relative error
against the float32 reference of 4.0-4.9e-3 here and 5.3-6.5e-3 for the two-kernel path.

One row only (batch-1 decode), no split-K (each program runs all of K: the q/k/v product's measured plan
on an H200), HALF a multiple of BLOCK_N / 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.dependent_launch import launch_options, wait_for_previous_kernel
from terse.kernels.w4a16_gemv_column import column_block, column_dot, prefetch_l2, prefetch_rows
from terse.kernels.w4a16_gemv_offset import fast_offset
from terse.kernels.w4a16_layout import Int4Weight


@triton.jit
def _store_rotated(
    total, offs_n, Bias, COS, SIN, POS, SLOT, KV, QOut, KOut, VOut, stride_cos, stride_plane, stride_slot,
    HAS_BIAS: tl.constexpr, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # total [BLOCK_N]: the products of the program's first-half columns, then of the matching second-half ones
    RUN: tl.constexpr = BLOCK_N // 2
    D: tl.constexpr = 2 * HALF
    x1, x2 = tl.split(tl.permute(tl.reshape(total, [2, RUN]), (1, 0)))  # [RUN] each
    col1, col2 = tl.split(tl.permute(tl.reshape(offs_n, [2, RUN]), (1, 0)))
    if HAS_BIAS:
        x1 += tl.load(Bias + col1).to(tl.float32)
        x2 += tl.load(Bias + col2).to(tl.float32)
    dt = QOut.dtype.element_ty
    x1 = x1.to(dt)  # the product as the plain GEMV stores it
    x2 = x2.to(dt)
    head = col1 // D
    d = col1 % D  # in [0, HALF)
    pos = tl.load(POS).to(tl.int64)
    slot = tl.load(SLOT).to(tl.int64)
    c = tl.load(COS + pos * stride_cos + d).to(dt).to(tl.float32)
    s = tl.load(SIN + pos * stride_cos + d).to(dt).to(tl.float32)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    o1 = ((a1 * c).to(dt).to(tl.float32) + (-a2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
    is_q = head < NUM_HEADS
    tl.store(QOut + head * D + d, o1, mask=is_q)
    tl.store(QOut + head * D + d + HALF, o2, mask=is_q)
    kh = head - NUM_HEADS
    is_k = (kh >= 0) & (kh < NUM_KV_HEADS)
    k_slot = KV + slot * stride_slot + kh * D + d
    tl.store(KOut + kh * D + d, o1, mask=is_k)
    tl.store(KOut + kh * D + d + HALF, o2, mask=is_k)
    tl.store(k_slot, o1, mask=is_k)
    tl.store(k_slot + HALF, o2, mask=is_k)
    vh = kh - NUM_KV_HEADS
    is_v = vh >= 0
    v_slot = KV + stride_plane + slot * stride_slot + vh * D + d
    tl.store(VOut + vh * D + d, x1, mask=is_v)
    tl.store(VOut + vh * D + d + HALF, x2, mask=is_v)
    tl.store(v_slot, x1, mask=is_v)
    tl.store(v_slot + HALF, x2, mask=is_v)


@triton.jit
def _w4a16_qkv_rope_kernel(
    X, QW, S, Z, Bias, COS, SIN, POS, SLOT, KV, QOut, KOut, VOut,
    N, K, stride_cos, stride_plane, stride_slot,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr, EVEN_K: tl.constexpr, NUM_STAGES: tl.constexpr, FAST: tl.constexpr,
    PDL: tl.constexpr, PREFETCH_ROWS: tl.constexpr,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n, n_mask, run_start, run_gap = column_block(pid_n, N, BLOCK_N, 2, HALF)
    if PREFETCH_ROWS > 0:  # the weight does not depend on the kernel before: fetch it while that one runs
        prefetch_l2(QW, 0, K, K, N, run_start, run_gap, PREFETCH_ROWS, BLOCK_N, 2)
    wait_for_previous_kernel(PDL)
    total = column_dot(X, X, X, QW, S, Z, N, K, K, 0, offs_n, n_mask, GROUP_SIZE, HAS_ZEROS, BLOCK_N, GROUPS, True,
                       EVEN_K, NUM_STAGES, FAST, 0)
    _store_rotated(total, offs_n, Bias, COS, SIN, POS, SLOT, KV, QOut, KOut, VOut, stride_cos, stride_plane,
                   stride_slot, HAS_BIAS, NUM_HEADS, NUM_KV_HEADS, HALF, BLOCK_N)


def fits_qkv_rope(weight: Int4Weight, num_heads: int, num_kv_heads: int, block_n: int) -> bool:
    """Whether the fused q/k/v + RoPE kernel takes this weight and column block: N = (H + 2 KVH) D with
    D / 2 a multiple of block_n / 2."""
    heads = num_heads + 2 * num_kv_heads
    if weight.out_features % heads:
        return False
    half = weight.out_features // heads // 2
    return half >= 1 and half % (block_n // 2) == 0


def launch_qkv_rope(
    x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None, cos_table: torch.Tensor, sin_table: torch.Tensor,
    positions: torch.Tensor, layer_kv: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
    block_n: int, groups: int, num_warps: int, num_stages: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [1, K] 16-bit (one decode row); weight: the fused q/k/v projection; cos_table, sin_table: float32
    [max_len, D] (equal halves); positions, slot_mapping: [1]; layer_kv: [2, NB, bs, KVH, D] contiguous
    (mutated at the slot). -> (q [1, H, D], k [1, KVH, D] rotated, v [1, KVH, D]), equal to the product
    followed by `rope_store_triton`. Callers check `fits_qkv_rope` and the plan (a column GEMV without
    split-K)."""
    n, k = weight.out_features, weight.in_features
    head_dim = n // (num_heads + 2 * num_kv_heads)
    if not fits_qkv_rope(weight, num_heads, num_kv_heads, block_n) or x.shape != (1, k):
        raise KernelInputError(
            f"the fused q/k/v + RoPE kernel takes one row of {k} and N = (H + 2 KVH) D with D / 2 a multiple of "
            f"block_n / 2; got x {tuple(x.shape)}, N={n}, H={num_heads}, KVH={num_kv_heads}, block_n={block_n}"
        )
    if not layer_kv.is_contiguous() or tuple(layer_kv.shape[-2:]) != (num_kv_heads, head_dim) or layer_kv.dtype != x.dtype:
        raise KernelInputError(f"layer_kv {tuple(layer_kv.shape)} {layer_kv.dtype} does not fit [2, NB, bs, {num_kv_heads}, "
                               f"{head_dim}] {x.dtype}")
    if cos_table.dtype != torch.float32 or cos_table.shape[1] != head_dim or cos_table.stride() != sin_table.stride():
        raise KernelInputError("cos/sin tables must be float32 [max_len, head_dim] with equal strides")
    q = torch.empty(1, num_heads, head_dim, dtype=x.dtype, device=x.device)
    k_out = torch.empty(1, num_kv_heads, head_dim, dtype=x.dtype, device=x.device)
    v = torch.empty(1, num_kv_heads, head_dim, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n // 2, block_n // 2),)
    step = groups * weight.group_size
    options = launch_options(x)
    _w4a16_qkv_rope_kernel[grid](
        x, weight.qweight, weight.scales, weight.zeros if weight.zeros is not None else weight.scales,
        bias if bias is not None else q, cos_table, sin_table, positions, slot_mapping, layer_kv, q, k_out, v,
        n, k, cos_table.stride(0), layer_kv.stride(0), layer_kv.stride(2),
        GROUP_SIZE=weight.group_size, HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, GROUPS=groups, EVEN_K=k % step == 0, NUM_STAGES=num_stages, FAST=fast_offset(x),
        PREFETCH_ROWS=prefetch_rows((grid[0], 1), block_n, k) if options["PDL"] else 0,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2,
        num_warps=num_warps, num_stages=num_stages, **options,
    )
    return q, k_out, v
