"""The varlen layout is checked once, on construction, and names what is wrong."""

from __future__ import annotations

import pytest
import torch

from terse.errors import KernelInputError
from terse.kernels.varlen import VarlenBatch, VarlenLayout


def test_from_lengths_offsets_and_rows():
    layout = VarlenLayout.from_lengths([3, 0, 5], [4, 2, 5])
    assert layout.cu_seqlens_q.tolist() == [0, 3, 3, 8]
    assert layout.cu_seqlens_k.tolist() == [0, 4, 6, 11]
    assert layout.cu_seqlens_q.dtype == torch.int32
    assert (layout.max_seqlen_q, layout.max_seqlen_k, layout.num_seqs) == (5, 5, 3)
    assert layout.lengths == [(3, 4), (0, 2), (5, 5)]
    assert (layout.q_rows(2), layout.k_rows(2)) == (slice(3, 8), slice(6, 11))
    q_lens, k_lens = layout.device_lengths()
    assert q_lens.tolist() == [3, 0, 5] and k_lens.tolist() == [4, 2, 5]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: VarlenLayout(torch.tensor([0, 4]), torch.tensor([0, 4], dtype=torch.int32), 4, 4), "int64"),
        (lambda: VarlenLayout.from_lengths([2], [2, 3]), "one of each per sequence"),
        (lambda: VarlenLayout(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 2, 4], dtype=torch.int32), 2, 2),
         "cu_seqlens_q has 2 entries but cu_seqlens_k has 3"),
        (lambda: VarlenLayout(torch.tensor([1, 4], dtype=torch.int32), torch.tensor([1, 4], dtype=torch.int32), 3, 3),
         "must start at 0"),
        (lambda: VarlenLayout(torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32), 3, 4),
         "pass the true maxima"),
        (lambda: VarlenLayout(torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32), 5, 4),
         "max_seqlen_q <= max_seqlen_k"),
    ],
)
def test_layout_errors(build, message):
    with pytest.raises(KernelInputError, match=message):
        build()


def test_batch_sizes_and_errors():
    layout = VarlenLayout.from_lengths([3, 5], [4, 5])
    q, k = torch.randn(8, 4, 16), torch.randn(9, 2, 16)
    batch = VarlenBatch(q, k, k, layout)
    assert (batch.num_seqs, batch.num_q_heads, batch.num_kv_heads, batch.head_dim, batch.group_size) == (2, 4, 2, 16, 2)
    with pytest.raises(KernelInputError, match="k has shape"):
        VarlenBatch(q, k, k[:, :1], layout)
    with pytest.raises(KernelInputError, match="dtype"):
        VarlenBatch(q.long(), k, k, layout)
    with pytest.raises(KernelInputError, match="stride"):
        VarlenBatch(q.transpose(1, 2).contiguous().transpose(1, 2), k, k, layout)
    with pytest.raises(KernelInputError, match="q has 7"):
        VarlenBatch(q[:7], k, k, layout)
