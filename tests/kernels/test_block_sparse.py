"""block_sparse_attention (Triton, interpreted on the CPU) against its float32 reference."""

from __future__ import annotations

import pytest
import torch

from terse.errors import KernelInputError
from terse.kernels.block_sparse import block_sparse_attention
from terse.kernels.checks import num_blocks
from terse.kernels.reference import reference_block_sparse_attention
from terse.kernels.varlen import VarlenBatch, VarlenLayout
from tests.kernels.helpers import dense_causal, make_batch, rel_err


def random_index(num_seqs: int, num_heads: int, num_q_blocks: int, num_k_blocks: int, width: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(num_k_blocks, generator=gen)[:width] for _ in range(num_seqs * num_heads * num_q_blocks)])
    idx = idx.view(num_seqs, num_heads, num_q_blocks, width).to(torch.int32).contiguous()
    count = torch.randint(0, width + 1, (num_seqs, num_heads, num_q_blocks), generator=gen, dtype=torch.int32)
    return idx, count


@pytest.mark.parametrize(
    ("head_dim", "num_q_heads", "num_kv_heads", "q_lens", "k_lens", "block"),
    [
        (64, 4, 4, [50, 33], [50, 90], 16),  # GQA 1, ragged, q_len < k_len
        (128, 4, 2, [40], [72], 16),  # GQA 2, head dim 128
        (64, 4, 1, [20, 64, 7], [20, 100, 30], 32),  # GQA 4, three sequences, partial tiles
    ],
)
def test_matches_reference_random_index(head_dim, num_q_heads, num_kv_heads, q_lens, k_lens, block):
    batch = make_batch(q_lens, k_lens, num_q_heads, num_kv_heads, head_dim, seed=head_dim + block)
    nqb, nkb = num_blocks(batch.layout.max_seqlen_q, block), num_blocks(batch.layout.max_seqlen_k, block)
    idx, count = random_index(len(q_lens), num_q_heads, nqb, nkb, min(3, nkb), seed=1)
    kw = {"block_size_q": block, "block_size_k": block}
    out = block_sparse_attention(batch, idx, count, head_dim**-0.5, **kw)
    ref = reference_block_sparse_attention(batch, idx, count, head_dim**-0.5, **kw)
    assert rel_err(out, ref) < 1e-5


def test_full_index_is_dense_causal_attention():
    batch = make_batch([45, 64], [80, 64], 4, 2, 64, seed=3)
    block = 16
    nqb, nkb = num_blocks(64, block), num_blocks(80, block)
    idx = torch.arange(nkb, dtype=torch.int32).expand(2, 4, nqb, nkb).contiguous()
    count = torch.full((2, 4, nqb), nkb, dtype=torch.int32)  # blocks in the future are masked away
    out = block_sparse_attention(batch, idx, count, 0.125, block_size_q=block, block_size_k=block)
    assert rel_err(out, dense_causal(batch, 0.125)) < 1e-5


def test_empty_rows_and_future_blocks_give_zeros():
    batch = make_batch([32], [32], 2, 2, 64, seed=4)
    idx = torch.tensor([[[[1], [1]], [[0], [0]]]], dtype=torch.int32)  # head 0, q block 0 -> future block 1
    count = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.int32)  # head 0, q block 1: nothing listed
    out = block_sparse_attention(batch, idx, count, 0.125, block_size_q=16, block_size_k=16)
    assert torch.all(out[:, 0] == 0)  # head 0 sees nothing: zeros, not NaN
    assert not out.isnan().any()
    ref = reference_block_sparse_attention(batch, idx, count, 0.125, block_size_q=16, block_size_k=16)
    assert rel_err(out, ref) < 1e-5


def test_columns_and_head_subset():
    batch = make_batch([40, 24], [70, 24], 4, 2, 64, seed=5)
    block, heads = 16, torch.tensor([3, 0], dtype=torch.int32)
    nqb = num_blocks(40, block)
    idx = torch.full((2, 2, nqb, 1), 0, dtype=torch.int32)
    count = torch.ones(2, 2, nqb, dtype=torch.int32)
    cols = torch.tensor([20, 33, 47, 52, 69], dtype=torch.int32).expand(2, 2, nqb, 5).contiguous()
    col_count = torch.tensor([5, 3], dtype=torch.int32)[:, None, None].expand(2, 2, nqb).contiguous()
    kw = {"block_size_q": block, "block_size_k": block, "head_ids": heads, "col_idx": cols, "col_count": col_count}
    out = block_sparse_attention(batch, idx, count, 0.125, **kw)
    ref = reference_block_sparse_attention(batch, idx, count, 0.125, **kw)
    assert rel_err(out, ref) < 1e-5
    assert torch.all(out[:, [1, 2]] == 0)  # heads outside head_ids untouched


def test_half_precision_close_to_float32_reference():
    batch = make_batch([32], [48], 2, 1, 64, dtype=torch.float16, seed=6)
    nkb = num_blocks(48, 16)
    idx = torch.arange(nkb, dtype=torch.int32).expand(1, 2, 2, nkb).contiguous()
    count = torch.full((1, 2, 2), nkb, dtype=torch.int32)
    out = block_sparse_attention(batch, idx, count, 0.125, block_size_q=16, block_size_k=16)
    assert out.dtype == torch.float16
    assert rel_err(out, dense_causal(batch, 0.125)) < 5e-3


def test_launcher_rejects_bad_inputs():
    batch = make_batch([16], [16], 4, 2, 64)
    idx = torch.zeros(1, 4, 1, 1, dtype=torch.int32)
    count = torch.ones(1, 4, 1, dtype=torch.int32)
    with pytest.raises(KernelInputError, match="int64"):
        block_sparse_attention(batch, idx.long(), count, 0.1, block_size_q=16, block_size_k=16)
    with pytest.raises(KernelInputError, match="leading shape"):
        block_sparse_attention(batch, idx[:, :2], count[:, :2], 0.1, block_size_q=16, block_size_k=16)
    with pytest.raises(KernelInputError, match="head_dim 48"):
        narrow = VarlenBatch(batch.q[..., :48], batch.k[..., :48], batch.v[..., :48], batch.layout)
        block_sparse_attention(narrow, idx, count, 0.1)
    with pytest.raises(KernelInputError, match="not a multiple"):
        VarlenBatch(batch.q[:, :3], batch.k, batch.v, batch.layout)
    with pytest.raises(KernelInputError, match="q_len=16 > k_len=8"):
        short = batch.layout
        VarlenLayout(short.cu_seqlens_q, short.cu_seqlens_q // 2, 16, 16)
    with pytest.raises(KernelInputError, match="q_len=16 > k_len=8"):
        VarlenLayout.from_lengths([16], [8])
    with pytest.raises(KernelInputError, match="last entry must equal the token count"):
        VarlenBatch(batch.q[:8], batch.k, batch.v, batch.layout)
    with pytest.raises(KernelInputError, match="block_size_q=48"):
        block_sparse_attention(batch, idx, count, 0.1, block_size_q=48)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # sequence 1 itself is all NaN on purpose
def test_columns_past_a_sequence_never_read_the_next_one():
    batch = make_batch([24, 40], [24, 70], 2, 1, 64, seed=8)
    batch.k[24:] = float("nan")  # sequence 1's keys and values: any read from sequence 0 would show
    batch.v[24:] = float("nan")
    nqb = num_blocks(40, 16)
    idx = torch.zeros(2, 2, nqb, 1, dtype=torch.int32)
    count = torch.ones(2, 2, nqb, dtype=torch.int32)
    cols = torch.tensor([20, 33, 47], dtype=torch.int32).expand(2, 2, nqb, 3).contiguous()
    col_count = torch.full((2, 2, nqb), 3, dtype=torch.int32)
    kw = {"block_size_q": 16, "block_size_k": 16, "col_idx": cols, "col_count": col_count}
    out = block_sparse_attention(batch, idx, count, 0.125, **kw)
    ref = reference_block_sparse_attention(batch, idx, count, 0.125, **kw)
    assert torch.isfinite(out[:24]).all()
    assert rel_err(out[:24], ref[:24]) < 1e-5
