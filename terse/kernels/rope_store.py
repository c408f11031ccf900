"""Triton RoPE + KV write: one launch rotates a token's q and k and writes its k and v into the paged
KV pool, instead of a dozen elementwise kernels and two index copies.

Per token t (one program), with cos/sin looked up at positions[t] in float32 tables [max_len, D] whose
halves are equal (emb = cat(freqs, freqs)):

    x = [x1 | x2]  ->  [x1 * cos - x2 * sin | x2 * cos + x1 * sin]

each product rounded to the input dtype, then the sum (as torch's rotate-half form does op by op, with
cos and sin first cast to the input dtype). Rotated k and v go to slot slot_mapping[t] of the pool
(slot = block * block_size + offset). The torch reference is
`terse.kernels.decode_reference.rope_store_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.kernels.dependent_launch import launch_options, wait_for_previous_kernel


@triton.jit
def _rotate_store(  # type: ignore[no-untyped-def]
    src_ptr, stride_h, dst_ptr, dst2_ptr, num_heads, cos, sin,
    H_PAD: tl.constexpr, HALF: tl.constexpr, STORE2: tl.constexpr,
):
    """Rotate [num_heads, 2 * HALF] at src (head stride stride_h) into dst (contiguous heads), and into
    dst2 as well when STORE2 (dst2 head stride 2 * HALF)."""
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, HALF)
    hm = (h < num_heads)[:, None]
    src = src_ptr + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(src, mask=hm, other=0.0)
    x2 = tl.load(src + HALF, mask=hm, other=0.0)
    dt = x1.dtype
    c = cos.to(dt).to(tl.float32)[None, :]
    s = sin.to(dt).to(tl.float32)[None, :]
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    o1 = ((a1 * c).to(dt).to(tl.float32) + (-a2 * s).to(dt).to(tl.float32)).to(dt)
    o2 = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)
    dst = h[:, None] * (2 * HALF) + d[None, :]
    tl.store(dst_ptr + dst, o1, mask=hm)
    tl.store(dst_ptr + dst + HALF, o2, mask=hm)
    if STORE2:
        tl.store(dst2_ptr + dst, o1, mask=hm)
        tl.store(dst2_ptr + dst + HALF, o2, mask=hm)


@triton.jit
def _rope_store_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, kv_ptr, q_out_ptr, k_out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_plane, stride_slot,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, H_PAD: tl.constexpr, KVH_PAD: tl.constexpr,
    HALF: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + d)
    sin = tl.load(sin_ptr + pos * stride_cos + d)
    head_dim: tl.constexpr = 2 * HALF
    _rotate_store(q_ptr + t * stride_qt, stride_qh, q_out_ptr + t * NUM_HEADS * head_dim, q_out_ptr,
                  NUM_HEADS, cos, sin, H_PAD=H_PAD, HALF=HALF, STORE2=False)
    _rotate_store(k_ptr + t * stride_kt, stride_kh, k_out_ptr + t * NUM_KV_HEADS * head_dim,
                  kv_ptr + slot * stride_slot, NUM_KV_HEADS, cos, sin, H_PAD=KVH_PAD, HALF=HALF, STORE2=True)
    h = tl.arange(0, KVH_PAD)
    dd = tl.arange(0, head_dim)
    hm = (h < NUM_KV_HEADS)[:, None]
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + dd[None, :], mask=hm, other=0.0)
    tl.store(kv_ptr + stride_plane + slot * stride_slot + h[:, None] * head_dim + dd[None, :], v, mask=hm)


def rope_store_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
    positions: torch.Tensor, layer_kv: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k, v: [T, KVH, D] (any row and head strides, contiguous D: e.g. views into one
    fused qkv projection); cos_table, sin_table: [max_len, D] float32; positions, slot_mapping: [T] int;
    layer_kv: [2, NB, bs, KVH, D] contiguous (mutated at the slots). -> (q, k) rotated, contiguous."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != v.shape or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if min(q.stride(-1), k.stride(-1), v.stride(-1)) != 1 or max(q.stride(-1), k.stride(-1), v.stride(-1)) != 1:
        raise ValueError("q, k and v need contiguous head dims")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim={head_dim} must be a power of two >= 16")
    if not layer_kv.is_contiguous() or layer_kv.shape[-2:] != (num_kv_heads, head_dim) or layer_kv.dtype != k.dtype:
        raise ValueError(f"layer_kv {tuple(layer_kv.shape)} {layer_kv.dtype} does not fit k {tuple(k.shape)} {k.dtype}")
    if cos_table.dtype != torch.float32 or cos_table.shape[1] != head_dim or cos_table.stride() != sin_table.stride():
        raise ValueError("cos/sin tables must be float32 [max_len, head_dim] with equal strides")
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(num_tokens, num_kv_heads, head_dim, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    _rope_store_kernel[(num_tokens,)](
        q, k, v, cos_table, sin_table, positions, slot_mapping, layer_kv, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_table.stride(0),
        layer_kv.stride(0), layer_kv.stride(2),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, H_PAD=triton.next_power_of_2(num_heads),
        KVH_PAD=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2, **launch_options(q),
    )
    return q_out, k_out
