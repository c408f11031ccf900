"""Shared builders for the kernel tests: random varlen batches and error measures."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton-dependent module is imported

import torch

from terse.kernels.varlen import VarlenBatch, VarlenLayout


def layout(q_lens: list[int], k_lens: list[int]) -> VarlenLayout:
    return VarlenLayout.from_lengths(q_lens, k_lens)


def make_batch(
    q_lens: list[int],
    k_lens: list[int],
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> VarlenBatch:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(sum(k_lens), num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(sum(k_lens), num_kv_heads, head_dim, generator=gen).to(dtype)
    return VarlenBatch.from_lengths(q, k, v, q_lens, k_lens)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


def dense_causal(batch: VarlenBatch, scale: float) -> torch.Tensor:
    """Plain per-sequence float32 causal attention (bottom-right aligned), independent of terse's kernels."""
    out = torch.zeros(batch.q.shape, dtype=torch.float32)
    group = batch.q.shape[1] // batch.k.shape[1]
    cq, ck = batch.layout.cu_seqlens_q.tolist(), batch.layout.cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q = batch.q[cq[b] : cq[b + 1]].float()
        k = batch.k[ck[b] : ck[b + 1]].float().repeat_interleave(group, dim=1)
        v = batch.v[ck[b] : ck[b + 1]].float().repeat_interleave(group, dim=1)
        q_len, k_len = q.shape[0], k.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        allowed = torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[cq[b] : cq[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
    return out
