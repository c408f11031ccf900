"""Triton RMSNorm with the residual add fused in: one launch reads x and the residual stream once,
writes the new residual stream and the normalised row.

    residual_out = x + residual                     (rounded to the input dtype, as torch's add)
    out = weight * (residual_out * rsqrt(mean(residual_out^2) + eps))   (normalised in float32,
                                                     cast to the input dtype, then scaled)

One program per row (rows are the step's tokens; the row fits one block). The torch reference is
`terse.kernels.decode_reference.add_rms_norm_reference` (and `rms_norm_reference` without residual).

`add_rms_norm_prep_triton` also writes what a one-row INT4 product after the norm would otherwise work out
from its input in every program (`terse.kernels.row_prep`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.kernels.dependent_launch import launch_options, wait_for_previous_kernel
from terse.kernels.row_prep import RowPrep, empty_prep
from terse.kernels.row_prep_kernels import store_prep


@triton.jit
def _add_rms_norm_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, prep_x_ptr, prep_sums_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, PREP_SPAN: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / N + eps)
    y = (x32 * inv).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * stride_out + offs, out, mask=mask)
    if PREP_SPAN > 0:  # the next product's input side (row_prep): x in float32 and its sums per span
        spans = (N + PREP_SPAN - 1) // PREP_SPAN
        store_prep(out.to(tl.float32), offs, N, prep_x_ptr + row * N, prep_sums_ptr + row * spans * 2,
                   BLOCK // PREP_SPAN, PREP_SPAN)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, N] with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not fit x [*, {x.shape[1]}] {x.dtype}")


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [T, N] (residual None: plain RMSNorm) -> (normed [T, N], new residual [T, N];
    with residual None the new residual is x itself)."""
    out, res_out, _ = _launch(x, residual, weight, eps, 0)
    return out, res_out


def add_rms_norm_prep_triton(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, span: int
) -> tuple[torch.Tensor, torch.Tensor, RowPrep]:
    """`add_rms_norm_triton` of one row x [1, N] that also writes the normed row's `RowPrep` with sums per
    `span` inputs (8, or the next product's group size: a power of two up to N's block)."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"the norm writes a row prep for one row; got x {tuple(x.shape)}")
    block = triton.next_power_of_2(x.shape[1])
    if span < 8 or span & (span - 1) or span > block:
        raise ValueError(f"row prep span {span} must be a power of two in [8, {block}]")
    out, res_out, prep = _launch(x, residual, weight, eps, span)
    assert prep is not None
    return out, res_out, prep


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, span: int
) -> tuple[torch.Tensor, torch.Tensor, RowPrep | None]:
    _check(x, weight)
    num_rows, n = x.shape
    out = torch.empty_like(x)
    if residual is not None:
        if residual.shape != x.shape or residual.stride(-1) != 1 or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x {tuple(x.shape)}")
        res_out = torch.empty_like(x)
    else:
        residual, res_out = x, x
    block = triton.next_power_of_2(n)
    prep = empty_prep(n, span, x.device) if span else None
    _add_rms_norm_kernel[(num_rows,)](
        x, residual, weight, out, res_out, prep.values if prep else out, prep.sums if prep else out,
        x.stride(0), residual.stride(0), out.stride(0), res_out.stride(0),
        n, eps,
        HAS_RESIDUAL=res_out is not x, BLOCK=block, PREP_SPAN=span, num_warps=8 if block >= 4096 else 4,
        **launch_options(x),
    )
    return out, res_out, prep
