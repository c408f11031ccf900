"""Input checks shared by every kernel launcher and its reference.

The varlen layout (the same as flash-attn's varlen functions):

    q: [total_q, num_q_heads, head_dim]    sequence b owns rows cu_seqlens_q[b] : cu_seqlens_q[b + 1]
    k: [total_k, num_kv_heads, head_dim]   sequence b owns rows cu_seqlens_k[b] : cu_seqlens_k[b + 1]
    v: like k

A sequence's queries are the LAST q_len tokens of its k_len >= q_len tokens of context (prefix-cache
reuse), so query i sits at absolute position k_len - q_len + i and sees keys 0 .. k_len - q_len + i:

    keys      0 1 2 3 4 5 6 7          k_len = 8, q_len = 3, offset = 5
    query 0   x x x x x x . .          (absolute position 5)
    query 1   x x x x x x x .
    query 2   x x x x x x x x

Every failed check raises `KernelInputError` naming the tensor, what it is, what was expected and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from terse.errors import KernelInputError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class VarlenShape:
    """Sizes read off a checked varlen batch."""

    num_seqs: int
    """Number of sequences in the batch (len(cu_seqlens_q) - 1)."""
    num_q_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads; num_q_heads is a multiple of it (GQA group = num_q_heads // num_kv_heads)."""
    head_dim: int
    """Channels per head (64 or 128)."""

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_q_heads // self.num_kv_heads


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_qkv_tensor(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.dim() != 3:
        raise KernelInputError(
            f"{name} has shape {tuple(t.shape)}; expected 3 dims [tokens, heads, head_dim] "
            "(varlen layout: concatenate the sequences along dim 0)"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{name} has dtype {t.dtype}; expected one of {SUPPORTED_DTYPES}: cast it")
    if t.stride(-1) != 1:
        raise KernelInputError(f"{name} has stride {t.stride(-1)} along head_dim; expected 1: pass {name}.contiguous()")
    if t.device != q.device or t.dtype != q.dtype:
        raise KernelInputError(
            f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}; put all on one device/dtype"
        )


def check_varlen_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    head_dims: tuple[int, ...] | None = SUPPORTED_HEAD_DIMS,
) -> VarlenShape:
    """Check q/k/v and the cumulative lengths of a varlen batch; return its sizes.

    `head_dims` lists the head dims allowed (the Triton kernels'); None allows any (torch code).

    Lengths are checked on the host only when the tensors live on the CPU (a device read would force a
    synchronization); on the GPU the caller vouches for q_len <= k_len and the max_seqlen bounds.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_qkv_tensor(name, t, q)
    if k.shape != v.shape:
        raise KernelInputError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[1]
    if k.shape[2] != head_dim:
        raise KernelInputError(f"k head_dim {k.shape[2]} != q head_dim {head_dim}; they must match")
    if head_dims is not None and head_dim not in head_dims:
        raise KernelInputError(
            f"head_dim {head_dim} is not supported by the Triton kernels; use one of {head_dims} "
            "(or the torch path: SparsePrefillConfig(backend='torch'))"
        )
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise KernelInputError(
            f"{num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads; GQA needs "
            "num_q_heads % num_kv_heads == 0"
        )
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 2:
            raise KernelInputError(
                f"{name} is {cu.dtype} of shape {tuple(cu.shape)}; expected int32 [num_seqs + 1] "
                "starting at 0 (torch.cumsum of the lengths, with a leading 0)"
            )
        if cu.device != q.device:
            raise KernelInputError(f"{name} is on {cu.device} but q is on {q.device}; move it")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise KernelInputError(
            f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has {cu_seqlens_k.numel()}; "
            "both must hold num_seqs + 1"
        )
    if max_seqlen_q < 1 or max_seqlen_k < max_seqlen_q:
        raise KernelInputError(
            f"max_seqlen_q={max_seqlen_q}, max_seqlen_k={max_seqlen_k}; expected 1 <= max_seqlen_q <= max_seqlen_k"
        )
    if q.device.type == "cpu":
        _check_lengths_on_host(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return VarlenShape(cu_seqlens_q.numel() - 1, num_q_heads, num_kv_heads, head_dim)


def _check_lengths_on_host(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
) -> None:
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    k_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    if int(cu_seqlens_q[0]) != 0 or int(cu_seqlens_k[0]) != 0:
        raise KernelInputError("cu_seqlens_q and cu_seqlens_k must start at 0")
    if int(cu_seqlens_q[-1]) != q.shape[0] or int(cu_seqlens_k[-1]) != k.shape[0]:
        raise KernelInputError(
            f"cu_seqlens end at q={int(cu_seqlens_q[-1])}, k={int(cu_seqlens_k[-1])} but q has {q.shape[0]} "
            f"and k has {k.shape[0]} rows; the last entry must equal the token count"
        )
    for b, (q_len, k_len) in enumerate(zip(q_lens, k_lens)):
        if q_len < 0 or q_len > k_len:
            raise KernelInputError(
                f"sequence {b} has q_len={q_len} > k_len={k_len} (or a negative length); queries are the "
                "last q_len of k_len context tokens, so 0 <= q_len <= k_len"
            )
        if q_len > max_seqlen_q or k_len > max_seqlen_k:
            raise KernelInputError(
                f"sequence {b} has q_len={q_len}, k_len={k_len} above max_seqlen_q={max_seqlen_q}, "
                f"max_seqlen_k={max_seqlen_k}; pass the true maxima"
            )


def check_device_for_triton(q: torch.Tensor) -> None:
    """Triton kernels run on CUDA, or on the CPU only under TRITON_INTERPRET=1."""
    if q.device.type != "cuda" and not interpreting():
        raise KernelInputError(
            f"tensors are on {q.device}; the Triton kernels need CUDA (or TRITON_INTERPRET=1 for tests). "
            "On the CPU use terse.kernels.prefill.sparse_prefill_attention, which takes the torch path"
        )


def check_index(
    name: str, index: torch.Tensor, leading: tuple[int, ...], device: torch.device, num_dims: int
) -> None:
    """An int32 index tensor whose leading dims are `leading` and whose last dim is contiguous."""
    if index.dtype != torch.int32 or index.dim() != num_dims:
        raise KernelInputError(
            f"{name} is {index.dtype} with {index.dim()} dims; expected int32 with {num_dims} dims"
        )
    if tuple(index.shape[: len(leading)]) != leading:
        raise KernelInputError(
            f"{name} has leading shape {tuple(index.shape[: len(leading)])}; expected {leading} "
            "(num_seqs, heads, num_q_blocks for max_seqlen_q)"
        )
    if index.device != device:
        raise KernelInputError(f"{name} is on {index.device}; expected {device} (the device of q)")
    if index.numel() and index.stride(-1) != 1:
        raise KernelInputError(f"{name} has a non-unit last stride; pass {name}.contiguous()")


def check_block_size(name: str, value: int) -> None:
    """Tile sizes the kernels are compiled for."""
    if value not in (16, 32, 64, 128):
        raise KernelInputError(f"{name}={value} is not supported; use 16, 32, 64 or 128")


def num_blocks(length: int, block_size: int) -> int:
    """Blocks of `block_size` that cover `length` tokens (the last one may be partial)."""
    return -(-length // block_size)
