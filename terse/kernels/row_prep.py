"""The input side of a one-row INT4 product, worked out once by the kernel that writes the row.

The column GEMV (`w4a16_gemv_column`) turns a 16-bit x into float32 and, for every packed row of eight
inputs, the sums its offset-float arithmetic subtracts, (2048 sum_even x + 128 sum_odd x) and sum x. Every
program of the product does this for every row it reads, and threads sharing a row repeat it. A kernel that
writes x anyway (a norm, the gate/up product's store) can write these once, as a `RowPrep`:

    values  x widened to float32, [K]
    sums    [K / span, 2] float32: per span of `span` consecutive inputs (8: a packed row; or a whole
            quantization group) (c, t) = (-(2048 * sum of x at even k + 128 * sum of x at odd k), sum of x)

With per-row sums the product computes exactly what it computes from x itself (the same operations in the
same order). With per-group sums the offsets come off once per group and column instead of once per
packed row and column, which rounds differently (within the product's float32 accumulation error).

On an H200 (8B shapes, one row, bf16, launch-free) this made the column tiles of 32 columns per warp 9-17%
faster (gate/up 25.9 -> 23.1 us with group sums, down 14.3 -> 13.0 us with per-row sums, the LM head 92.0 ->
76.2 us) and the narrow four-warp tiles of q/k/v and o slower (q/k/v 8.1 -> 8.5 us with per-row sums, 10.5 us
with group sums; o 6.2 -> 6.4 and 13.2 us), so a product takes a prep only where its tile is wide per warp
(`w4a16.row_prep_span`).

This module is torch only; the Triton side that writes a prep is `row_prep_kernels`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from terse.errors import KernelInputError

PACKED_ROW = 8
"""Inputs per packed INT4 word: the span of per-row sums."""


class RowPrep(NamedTuple):
    """x of a one-row product as the column GEMV's loop uses it (see the module docstring)."""

    values: torch.Tensor
    """[1, K] float32: x rounded to its 16-bit dtype, then widened."""
    sums: torch.Tensor
    """[1, K / span, 2] float32 (span divides K rounded up): (c, t) per span of inputs."""
    span: int
    """8 (a packed row) or the consumer's quantization group size."""

    def check(self, k: int) -> None:
        spans = -(-k // self.span)
        if self.span < PACKED_ROW or self.span & (self.span - 1):
            raise KernelInputError(f"row prep span {self.span} must be a power of two >= {PACKED_ROW}")
        if self.values.shape != (1, k) or self.values.dtype != torch.float32 or not self.values.is_contiguous():
            raise KernelInputError(f"row prep values {tuple(self.values.shape)} {self.values.dtype} do not fit "
                                   f"[1, {k}] float32 contiguous")
        if self.sums.shape != (1, spans, 2) or self.sums.dtype != torch.float32 or not self.sums.is_contiguous():
            raise KernelInputError(f"row prep sums {tuple(self.sums.shape)} {self.sums.dtype} do not fit "
                                   f"[1, {spans}, 2] float32 contiguous")


def empty_prep(k: int, span: int, device: torch.device) -> RowPrep:
    """Buffers for a producer kernel to fill."""
    return RowPrep(torch.empty(1, k, dtype=torch.float32, device=device),
                   torch.empty(1, -(-k // span), 2, dtype=torch.float32, device=device), span)


def row_prep_reference(x: torch.Tensor, span: int) -> RowPrep:
    """The prep of x [1, K] (16-bit) in torch: per-row sums in the order the column GEMV adds them."""
    k = x.shape[1]
    values = x.float().contiguous()
    padded = torch.nn.functional.pad(values, (0, (-k) % span)).view(-1, span)
    if span == PACKED_ROW:
        even = (padded[:, 0] + padded[:, 2]) + (padded[:, 4] + padded[:, 6])
        odd = (padded[:, 1] + padded[:, 3]) + (padded[:, 5] + padded[:, 7])
    else:
        even, odd = padded[:, 0::2].sum(1), padded[:, 1::2].sum(1)
    sums = torch.stack((-(even * 2048.0 + odd * 128.0), even + odd), 1)
    return RowPrep(values, sums[None].contiguous(), span)
