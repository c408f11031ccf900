"""Torch references of the engine's fused per-layer kernels, and the engine's path wherever the Triton
kernels do not run (CPU, float32). No triton import here.

Each function computes what the Hugging Face Llama implementation computes, op for op and in the same
dtypes, so that float32 greedy decoding matches transformers token for token; the Triton kernels beside
them (norm.py, rope_store.py, activation.py, paged_decode.py) fuse the same math into one launch and
are tested against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., N] -> weight * normalize(x): normalised in float32, scaled in x's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, N] -> (rms_norm(x + residual), x + residual): the residual stream's add fused
    with the next norm."""
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half form. x: [T, heads, D]; cos, sin: [T, 1, D] in x's dtype."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_store_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    layer_kv: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] (cos, sin: [T, 1, D] in their dtype) and write k and
    v [T, KVH, D] into layer_kv [2, NB, bs, KVH, D] at slot_mapping [T] (mutated). -> (q, k) rotated."""
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    flat = layer_kv.view(2, -1, *layer_kv.shape[-2:])  # [2, NB * bs, KVH, D]
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)
    return q, k


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] (gate | up) -> silu(gate) * up: [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def paged_decode_reference(
    q: torch.Tensor, layer_kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> torch.Tensor:
    """One query per sequence over its paged keys, in float32. q: [B, H, D]; layer_kv: [2, NB, bs, KVH,
    D]; block_tables: [B, W] int; context_lens: [B] int (>= 1). Returns [B, H, D] in q's dtype.

    Gathers [B, W * bs] keys; positions past each context length are masked out (their values are
    zeroed too, so whatever stale bits those slots hold cannot reach the output). Shapes depend only
    on (B, W), so the path can be captured in a CUDA graph.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = layer_kv.shape[-2]
    group = num_heads // num_kv_heads
    flat_tables = block_tables.reshape(-1)
    k = layer_kv[0].index_select(0, flat_tables).view(num_seqs, -1, *layer_kv.shape[-2:])  # [B, S, KVH, D]
    v = layer_kv[1].index_select(0, flat_tables).view(num_seqs, -1, *layer_kv.shape[-2:])
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]  # [B, S]
    v = v.float().masked_fill(~valid[:, :, None, None], 0.0)
    qg = q.view(num_seqs, num_kv_heads, group, head_dim).float()
    scores = torch.einsum("bkgd,bskd->bkgs", qg, k.float()) * head_dim**-0.5  # [B, KVH, G, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgs,bskd->bkgd", probs, v)  # [B, KVH, G, D]
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)
