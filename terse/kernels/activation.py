"""Triton SiLU-and-multiply of the fused gate/up projection: one launch instead of three.

    gate_up: [T, 2I] = [gate | up]  ->  out: [T, I] = silu(gate) * up

silu is computed in float32 and rounded to the input dtype, then multiplied by up and rounded again,
as torch does op by op. The torch reference is `terse.kernels.decode_reference.silu_mul_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from terse.kernels.dependent_launch import launch_options, wait_for_previous_kernel

BLOCK = 1024


@triton.jit
def silu_times(gate, up):
    # silu(gate) * up for 16-bit (or float32) gate and up, rounded to their dtype after the activation and
    # after the product, as torch rounds op by op (the INT4 gate/up product's store uses it too)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _silu_mul_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    x_ptr, out_ptr, stride_x, stride_out, I, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, silu_times(gate, up), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] with contiguous rows -> [T, I]."""
    if gate_up.dim() != 2 or gate_up.stride(-1) != 1 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2I] with contiguous rows, got {tuple(gate_up.shape)}")
    num_rows, width = gate_up.shape
    inner = width // 2
    out = torch.empty(num_rows, inner, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(num_rows, triton.cdiv(inner, BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0), inner, BLOCK=BLOCK,
        **launch_options(gate_up),
    )
    return out
