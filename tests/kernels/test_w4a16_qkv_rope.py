"""The fused q/k/v product with RoPE and the KV write in its store (terse/kernels/w4a16_qkv_rope.py)
against the column GEMV followed by `rope_store_triton`, under the Triton interpreter: q, k, v and the
pool bit for bit, with and without bias, ragged K, two block widths, GQA."""

from __future__ import annotations

import pytest
import torch

import tests.kernels  # noqa: F401  (switches Triton's interpreter on before triton loads)
from terse.errors import KernelInputError
from terse.kernels import w4a16
from terse.kernels.rope_store import rope_store_triton
from terse.kernels.w4a16 import Plan, w4a16_matmul_rope_store
from terse.kernels.w4a16_gemv_column import w4a16_gemv_column
from terse.kernels.w4a16_qkv_rope import fits_qkv_rope, launch_qkv_rope
from tests.kernels.test_w4a16 import random_weight


def _case(k: int, heads: int, kv_heads: int, head_dim: int, bias: bool, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n = (heads + 2 * kv_heads) * head_dim
    w = random_weight(k, n, 32, True, dtype, seed=seed)
    x = torch.randn(1, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    max_len = 64
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * (1e-2 ** torch.arange(0, 1, 2 / head_dim))[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    pool = torch.randn(2, 5, 4, kv_heads, head_dim, generator=gen).to(dtype)
    return w, x, b, emb.cos(), emb.sin(), torch.tensor([37]), torch.tensor([13]), pool


def _unfused(x, w, b, cos, sin, positions, slots, pool, heads, kv_heads, head_dim, block_n, groups):
    out = w4a16_gemv_column(x, w, b, block_n=block_n, groups=groups, split_k=1)  # [1, N]
    q, k, v = out.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(1, heads, head_dim), k.view(1, kv_heads, head_dim), v.view(1, kv_heads, head_dim)
    q, k = rope_store_triton(q, k, v, cos, sin, positions, pool, slots)
    return q, k, v


@pytest.mark.parametrize(
    ("k", "heads", "kv_heads", "head_dim", "block_n", "groups", "bias", "dtype"),
    [
        (256, 4, 2, 32, 16, 2, False, torch.float16),
        (256, 4, 2, 32, 32, 4, True, torch.bfloat16),  # one block per head half
        (200, 6, 1, 64, 32, 2, True, torch.float16),  # K ragged inside the last group; 6 q heads to 1 KV head
    ],
)
def test_fused_store_equals_the_product_then_rope_store(k, heads, kv_heads, head_dim, block_n, groups, bias, dtype):
    w, x, b, cos, sin, positions, slots, pool = _case(k, heads, kv_heads, head_dim, bias, dtype, seed=k + heads)
    want_pool = pool.clone()
    q, k_rot, v = launch_qkv_rope(x, w, b, cos, sin, positions, pool, slots, heads, kv_heads, block_n, groups, 4, 2)
    want_q, want_k, want_v = _unfused(x, w, b, cos, sin, positions, slots, want_pool, heads, kv_heads, head_dim,
                                      block_n, groups)
    assert torch.equal(q, want_q) and torch.equal(k_rot, want_k) and torch.equal(v, want_v)
    assert torch.equal(pool, want_pool)  # the slot's k and v, nothing else


def test_matmul_rope_store_takes_a_column_plan_without_split(monkeypatch: pytest.MonkeyPatch) -> None:
    heads, kv_heads, head_dim = 4, 2, 32
    w, x, b, cos, sin, positions, slots, pool = _case(256, heads, kv_heads, head_dim, True, torch.float16, seed=5)
    args = (cos, sin, positions, pool, slots, heads, kv_heads)

    def plan(block_n: int, split_k: int, kind: str = "column") -> Plan:
        return Plan(kind, (("block_n", block_n), ("groups", 2), ("split_k", split_k), ("num_warps", 4),
                           ("num_stages", 2)))

    monkeypatch.setattr(w4a16, "_plan", lambda x, weight, bias: plan(32, 1))
    want_pool = pool.clone()
    got = w4a16_matmul_rope_store(x, w, b, *args)
    want = _unfused(x, w, b, cos, sin, positions, slots, want_pool, heads, kv_heads, head_dim, 32, 2)
    assert got is not None and all(torch.equal(g, e) for g, e in zip(got, want)) and torch.equal(pool, want_pool)
    for other in (plan(32, 2), plan(64, 1), plan(32, 1, "offset")):  # split-K, blocks wider than a half, no column
        monkeypatch.setattr(w4a16, "_plan", lambda x, weight, bias, other=other: other)
        assert w4a16_matmul_rope_store(x, w, b, *args) is None
    assert w4a16_matmul_rope_store(torch.randn(2, 256).half(), w, b, *args) is None  # two rows


def test_shapes_that_do_not_fit_are_refused() -> None:
    w, x, b, cos, sin, positions, slots, pool = _case(256, 4, 2, 32, False, torch.float16, seed=1)
    assert fits_qkv_rope(w, 4, 2, 32) and not fits_qkv_rope(w, 4, 2, 64) and not fits_qkv_rope(w, 5, 2, 16)
    with pytest.raises(KernelInputError, match="D / 2 a multiple"):
        launch_qkv_rope(x, w, b, cos, sin, positions, pool, slots, 4, 2, 64, 2, 4, 2)
    with pytest.raises(KernelInputError, match="layer_kv"):
        launch_qkv_rope(x, w, b, cos, sin, positions, pool.float(), slots, 4, 2, 32, 2, 4, 2)
