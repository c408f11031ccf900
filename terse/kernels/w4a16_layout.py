"""terse's INT4 weight layout and its torch reference: dequantize, then matmul (no triton import).

A linear layer computes out = x @ W + bias with W: [K, N] (K = in_features, N = out_features; nn.Linear
stores W^T). INT4 weight-only quantization keeps W as 4-bit integers q in [0, 15] with one scale (and
one zero point) per group of `group_size` consecutive input rows and per output column:

    qweight  int32 [K / 8, N]   nibble j (bits 4j .. 4j + 3) of qweight[r, n] holds q[8r + j, n]
    scales   [G, N]             activation dtype; G = ceil(K / group_size) (the last group may be short)
    zeros    [G, N] or None     activation dtype, integer-valued zero points; None: symmetric, zero point 8

    W[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]

            n ->
    r = 0   [ q0  q0 ...]      one int32 per (r, n): q[8r + 0 .. 8r + 7, n], lowest nibble first
    r = 1   [ q8  q8 ...]      (GPTQ's qweight uses the same packing, so its qweight loads as is)

Packing along K keeps every output column independent: concatenating layers along N (q/k/v, gate/up)
concatenates qweight, scales and zeros along dim 1, and splitting them back is a column slice.
An optional input permutation (GPTQ's act-order checkpoints) reorders x's columns before the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from terse.errors import KernelInputError

PACK = 8
"""4-bit values per int32 word."""
SYMMETRIC_ZERO = 8
"""Zero point of the symmetric scheme (q - 8 spans [-8, 7])."""


@dataclass(frozen=True)
class Int4Weight:
    """One quantized [K, N] weight in terse's layout (see the module docstring)."""

    qweight: torch.Tensor
    """int32 [K / 8, N]."""
    scales: torch.Tensor
    """[G, N] in the activation dtype."""
    zeros: torch.Tensor | None
    """[G, N] in the activation dtype (integer values), or None for the symmetric scheme (zero point 8)."""
    group_size: int
    """Input rows per scale group (a multiple of 8)."""
    input_perm: torch.Tensor | None = None
    """int64 [K]: x[:, input_perm] is multiplied instead of x (act-order checkpoints); None: identity."""

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * PACK

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[0])

    def nbytes(self) -> int:
        """Bytes held by the tensors of this weight."""
        tensors = [self.qweight, self.scales, self.zeros, self.input_perm]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def check(self) -> None:
        """Raise `KernelInputError` naming the tensor when the layout is inconsistent."""
        check_int4_weight(self)


def check_int4_weight(w: Int4Weight) -> None:
    qw, scales, zeros = w.qweight, w.scales, w.zeros
    if qw.dtype != torch.int32 or qw.dim() != 2:
        raise KernelInputError(
            f"qweight is {qw.dtype} with shape {tuple(qw.shape)}; expected int32 [K / 8, N] (pack_int4)"
        )
    if w.group_size < PACK or w.group_size % PACK:
        raise KernelInputError(f"group_size={w.group_size} must be a positive multiple of {PACK}")
    k, n = w.in_features, w.out_features
    groups = -(-k // w.group_size)
    if scales.dim() != 2 or tuple(scales.shape) != (groups, n):
        raise KernelInputError(
            f"scales has shape {tuple(scales.shape)}; expected [{groups}, {n}] (ceil(K / group_size), N) "
            f"for K={k}, group_size={w.group_size}"
        )
    if not scales.is_floating_point():
        raise KernelInputError(f"scales is {scales.dtype}; expected the activation dtype (a float type)")
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != scales.dtype):
        raise KernelInputError(
            f"zeros is {zeros.dtype} {tuple(zeros.shape)}; expected {scales.dtype} {tuple(scales.shape)} "
            f"like scales"
        )
    for name, t in (("scales", scales), ("zeros", zeros), ("qweight", qw)):
        if t is not None and (t.device != qw.device or not t.is_contiguous()):
            raise KernelInputError(f"{name} must be contiguous and on {qw.device}; pass .contiguous()")
    perm = w.input_perm
    if perm is not None and (perm.dtype != torch.int64 or tuple(perm.shape) != (k,)):
        raise KernelInputError(f"input_perm is {perm.dtype} {tuple(perm.shape)}; expected int64 [{k}]")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: integer [K, N] with values in [0, 15], K a multiple of 8 -> int32 [K / 8, N]."""
    k, n = q.shape
    if k % PACK:
        raise KernelInputError(f"K={k} rows cannot be packed; K must be a multiple of {PACK}")
    q64 = q.to(torch.int64).view(k // PACK, PACK, n)
    if q64.numel() and (int(q64.min()) < 0 or int(q64.max()) > 15):
        raise KernelInputError("pack_int4 takes values in [0, 15]; clamp (and offset) them first")
    shifts = (torch.arange(PACK, device=q.device, dtype=torch.int64) * 4).view(1, PACK, 1)
    word = (q64 << shifts).sum(dim=1)  # [K / 8, N] in [0, 2**32)
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # the same bits as a signed int32
    return word.to(torch.int32)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K / 8, N] -> uint8 [K, N] with values in [0, 15]."""
    rows, n = qweight.shape
    shifts = (torch.arange(PACK, device=qweight.device, dtype=torch.int32) * 4).view(1, PACK, 1)
    q = (qweight.view(rows, 1, n) >> shifts) & 0xF  # arithmetic shift, then the low nibble
    return q.reshape(rows * PACK, n).to(torch.uint8)


def group_rows(values: torch.Tensor, group_size: int, num_rows: int) -> torch.Tensor:
    """[G, N] per-group values -> [num_rows, N], row k taking group k // group_size."""
    return values.repeat_interleave(group_size, dim=0)[:num_rows]


def dequantize(weight: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [K, N] weight in `dtype` (default: the scales' dtype), computed in that dtype:
    (q - zero) * scale, rows in the stored order (apply `input_perm` to x, not here)."""
    dtype = dtype or weight.scales.dtype
    k = weight.in_features
    q = unpack_int4(weight.qweight).to(dtype)
    scales = group_rows(weight.scales.to(dtype), weight.group_size, k)
    if weight.zeros is None:
        return (q - SYMMETRIC_ZERO) * scales
    return (q - group_rows(weight.zeros.to(dtype), weight.group_size, k)) * scales


def dense_weight(weight: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The equivalent nn.Linear weight [N, K] (contiguous) with `input_perm` undone: x @ result.T equals
    the quantized layer's product on x."""
    w = dequantize(weight, dtype)  # [K, N] rows in stored order
    if weight.input_perm is not None:
        unpermuted = torch.empty_like(w)
        unpermuted[weight.input_perm] = w  # stored row r multiplies x[:, perm[r]]
        w = unpermuted
    return w.t().contiguous()


def w4a16_reference(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype: dequantize in x's dtype, then one dense matmul (the CPU path and
    the kernels' reference)."""
    w = dense_weight(weight, x.dtype)  # [N, K]
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_w4a16_inputs(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> None:
    """x: [M, K] contiguous along K, in the scales' dtype, on the weight's device; bias: [N] or None."""
    weight.check()
    k, n = weight.in_features, weight.out_features
    if x.dim() != 2 or x.shape[1] != k:
        raise KernelInputError(f"x has shape {tuple(x.shape)}; expected [M, {k}] (flatten leading dims first)")
    if x.dtype not in ACTIVATION_DTYPES or x.dtype != weight.scales.dtype:
        raise KernelInputError(
            f"x is {x.dtype} but the scales are {weight.scales.dtype}; both must be one of {ACTIVATION_DTYPES} "
            f"and equal (quantize the layer for the activation dtype)"
        )
    if x.stride(1) != 1:
        raise KernelInputError(f"x has stride {x.stride(1)} along K; expected 1: pass x.contiguous()")
    if x.device != weight.qweight.device:
        raise KernelInputError(f"x is on {x.device} but the weight is on {weight.qweight.device}; move one")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != x.device):
        raise KernelInputError(f"bias has shape {tuple(bias.shape)} on {bias.device}; expected [{n}] on {x.device}")
