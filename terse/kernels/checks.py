"""Launcher input checks shared by the kernels (the varlen layout itself is checked in `varlen`).

Every failed check raises `KernelInputError` naming the tensor, what it is, what was expected and the fix.
"""

from __future__ import annotations

import os

import torch

from terse.errors import KernelInputError
from terse.kernels.varlen import VarlenBatch
from terse.validation import ErrorType, check_choice

SUPPORTED_HEAD_DIMS = (64, 128)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_triton_batch(batch: VarlenBatch) -> None:
    """What the Triton kernels add to a valid batch: a compiled head dim and a device they run on."""
    if batch.head_dim not in SUPPORTED_HEAD_DIMS:
        raise KernelInputError(
            f"head_dim {batch.head_dim} is not supported by the Triton kernels; use one of {SUPPORTED_HEAD_DIMS} "
            "(or the torch path: SparsePrefillConfig(backend='torch'))"
        )
    check_device_for_triton(batch.q)


def check_device_for_triton(q: torch.Tensor) -> None:
    """Triton kernels run on CUDA, or on the CPU only under TRITON_INTERPRET=1."""
    if q.device.type != "cuda" and not interpreting():
        raise KernelInputError(
            f"tensors are on {q.device}; the Triton kernels need CUDA (or TRITON_INTERPRET=1 for tests). "
            "On the CPU use terse.kernels.prefill.sparse_prefill, which takes the torch path"
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


BLOCK_SIZES = (16, 32, 64, 128)
"""Tile sizes the sparse kernels are compiled for."""


def check_block_size(name: str, value: int, error: ErrorType = KernelInputError) -> None:
    """A tile size the kernels are compiled for (`BLOCK_SIZES`)."""
    check_choice(name, value, BLOCK_SIZES, error=error)


def resolve_head_ids(head_ids: torch.Tensor | None, num_q_heads: int, device: torch.device) -> torch.Tensor:
    """The int32 query-head ids the index rows belong to (all heads when None)."""
    if head_ids is None:
        return torch.arange(num_q_heads, dtype=torch.int32, device=device)
    if head_ids.dtype != torch.int32 or head_ids.dim() != 1 or head_ids.device != device:
        raise KernelInputError(
            f"head_ids is {head_ids.dtype} of shape {tuple(head_ids.shape)} on {head_ids.device}; "
            f"expected int32 [H] on {device}"
        )
    return head_ids


def output_for(batch: VarlenBatch, out: torch.Tensor | None, head_ids: torch.Tensor | None) -> torch.Tensor:
    """The tensor a launcher writes into: `out` when given (checked), else a new one like q whose heads
    outside `head_ids` are zero."""
    q = batch.q
    if out is None:
        return torch.zeros_like(q) if head_ids is not None else torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise KernelInputError(f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}, unit last stride)")
    return out


def num_blocks(length: int, block_size: int) -> int:
    """Blocks of `block_size` that cover `length` tokens (the last one may be partial)."""
    return -(-length // block_size)
