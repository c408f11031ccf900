"""The engine's fused per-layer Triton kernels against their torch references (Triton's CPU
interpreter, small shapes): residual add + RMSNorm, RoPE + KV write, SiLU-and-multiply, paged decode
(split-K and single-split, ragged contexts, GQA ratios, stale pool contents)."""

from __future__ import annotations

import pytest
import torch

import tests.kernels  # noqa: F401  (switches Triton's interpreter on before triton loads)
from terse.kernels.activation import silu_mul_triton
from terse.kernels.decode_reference import (
    add_rms_norm_reference,
    paged_decode_reference,
    rms_norm_reference,
    rope_store_reference,
    silu_mul_reference,
)
from terse.kernels.norm import add_rms_norm_triton
from terse.kernels.paged_decode import choose_num_splits, paged_decode_triton
from terse.kernels.rope_store import rope_store_triton

DTYPES = [torch.float32, torch.float16]  # bf16 on the GPU (bench/engine.py): the interpreter truncates bf16


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(dtype: torch.dtype, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=gen).to(dtype)  # 96: not a power of two (masked block)
    res = torch.randn(5, 96, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    out, new_res = add_rms_norm_triton(x, res if with_residual else None, w, 1e-6)
    if with_residual:
        want, want_res = add_rms_norm_reference(x, res, w, 1e-6)
        torch.testing.assert_close(new_res, want_res, rtol=0, atol=0)  # the add rounds exactly like torch
    else:
        want = rms_norm_reference(x, w, 1e-6)
        assert new_res is x
    torch.testing.assert_close(out, want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 32), (6, 1, 64)])
def test_rope_store(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(2)
    num_tokens, max_len, num_blocks, bs = 7, 64, 6, 4
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)  # strided views into one projection, as in the model
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * (1e-2 ** torch.arange(0, 1, 2 / head_dim))[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    positions = torch.tensor([0, 5, 63, 17, 17, 2, 40])
    slots = torch.randperm(num_blocks * bs, generator=gen)[:num_tokens]
    pool = torch.randn(2, num_blocks, bs, num_kv_heads, head_dim, generator=gen).to(dtype)
    want_pool = pool.clone()
    got_q, got_k = rope_store_triton(q, k, v, cos, sin, positions, pool, slots)
    want_q, want_k = rope_store_reference(
        q, k, v, cos[positions].to(dtype)[:, None], sin[positions].to(dtype)[:, None], want_pool, slots
    )
    exact = {"rtol": 0, "atol": 0} if dtype != torch.float32 else tol(dtype)  # same roundings as torch
    torch.testing.assert_close(got_q, want_q, **exact)
    torch.testing.assert_close(got_k, want_k, **exact)
    torch.testing.assert_close(pool, want_pool, **exact)  # written slots, and nothing else touched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    gate_up = (3 * torch.randn(3, 2 * 1500, generator=gen)).to(dtype)  # 1500: two column blocks, ragged
    torch.testing.assert_close(silu_mul_triton(gate_up), silu_mul_reference(gate_up), **tol(dtype))


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 16), (8, 1, 32), (4, 4, 16)])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_paged_decode(num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int | None) -> None:
    gen = torch.Generator().manual_seed(num_heads * 100 + head_dim)
    num_blocks, block_size = 40, 16
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    kv[:, 0] = float("nan")  # stale bits in a block no table lists within its context
    q = torch.randn(4, num_heads, head_dim, generator=gen)
    tables = (1 + torch.randperm(num_blocks - 1, generator=gen)[:36]).view(4, 9)
    tables[0, 1:] = 0  # entries past a context are never read
    context_lens = torch.tensor([1, 16, 17, 144])  # one token, one full block, ragged, full table
    got = paged_decode_triton(q, kv, tables, context_lens, num_splits=num_splits)
    want = paged_decode_reference(q, kv, tables, context_lens)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_num_splits_fill_the_device_and_stay_powers_of_two() -> None:
    cpu = torch.device("cpu")  # 4 "multiprocessors" off the GPU
    assert choose_num_splits(1, 1, 256, 16, cpu) == 8
    assert choose_num_splits(64, 8, 256, 16, cpu) == 1
    assert choose_num_splits(1, 1, 4, 16, cpu) == 1  # 64 tokens: one tile, one split


def test_paged_decode_reference_equals_dense_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 6, 4, 2, 8, generator=gen)
    q = torch.randn(1, 4, 8, generator=gen)
    table = torch.tensor([[5, 2, 0]])
    ctx = 10
    k = kv[0, table[0]].reshape(-1, 2, 8)[:ctx].repeat_interleave(2, dim=1)  # [ctx, H, D]
    v = kv[1, table[0]].reshape(-1, 2, 8)[:ctx].repeat_interleave(2, dim=1)
    probs = torch.softmax(torch.einsum("hd,shd->hs", q[0], k) / 8**0.5, dim=-1)
    expected = torch.einsum("hs,shd->hd", probs, v)
    got = paged_decode_reference(q, kv, table, torch.tensor([ctx]))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("min_tiles", "num_stages"), [(1, 1), (2, 3), (3, None)])
def test_paged_decode_tunables_keep_the_result(min_tiles: int, num_stages: int | None) -> None:
    gen = torch.Generator().manual_seed(7)
    kv = torch.randn(2, 40, 16, 2, 32, generator=gen)
    q = torch.randn(3, 8, 32, generator=gen)
    tables = (1 + torch.randperm(39, generator=gen)[:36]).view(3, 12)
    context_lens = torch.tensor([5, 100, 190])  # one tile, two, three
    got = paged_decode_triton(q, kv, tables, context_lens, min_tiles_per_split=min_tiles, num_stages=num_stages)
    torch.testing.assert_close(got, paged_decode_reference(q, kv, tables, context_lens), atol=1e-5, rtol=1e-5)


def test_paged_decode_refuses_bad_tunables() -> None:
    q, kv = torch.randn(1, 4, 16), torch.randn(2, 4, 16, 2, 16)
    tables, lens = torch.zeros(1, 2, dtype=torch.int64), torch.tensor([3])
    with pytest.raises(ValueError, match="min_tiles_per_split"):
        paged_decode_triton(q, kv, tables, lens, min_tiles_per_split=0)
    with pytest.raises(ValueError, match="num_stages"):
        paged_decode_triton(q, kv, tables, lens, num_stages=9)


def test_pipeline_stages_follow_the_tiles_a_split_walks() -> None:
    from terse.kernels.paged_decode import pipeline_stages

    assert pipeline_stages(256, 16, 64) == 1  # batch 1 at 4096 tokens: one tile per split
    assert pipeline_stages(256, 16, 2) == 3  # batch 32: 32 tiles per split
