"""Round-to-nearest group-wise INT4 quantization of a dense weight into terse's layout.

Groups run along the input dimension (a row of nn.Linear's [N, K] weight is cut into pieces of
`group_size`); the last group may be short. Per group:

    asym:  range [min(w, 0), max(w, 0)] -> scale = range / 15, zero = round(-min / scale) in [0, 15],
           q = clamp(round(w / scale) + zero, 0, 15)          (0.0 stays exactly representable)
    sym:   m = the value of largest magnitude, scale = m / -8 (signed), zero point 8,
           q = clamp(round(w / scale) + 8, 0, 15)              (m maps to q = 0 exactly; all 16 levels used)

Scales are rounded to the activation dtype first and q is computed with the rounded scale, so the
stored weight dequantizes to exactly what the search and the error measures saw.
"""

from __future__ import annotations

import torch

from terse.kernels.w4a16_layout import SYMMETRIC_ZERO, Int4Weight, pack_int4

from .config import Scheme


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] float32 -> [N, G, group_size], the last group zero-padded."""
    n, k = weight.shape
    num_groups = -(-k // group_size)
    padded = torch.nn.functional.pad(weight, (0, num_groups * group_size - k))
    return padded.view(n, num_groups, group_size)


def quantize_groups(
    weight: torch.Tensor, group_size: int, scheme: Scheme, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight: [N, K] -> (q [N, G, group_size] float32 integers, scale [N, G, 1], zero [N, G, 1]), the
    scale rounded to `dtype` and held in float32."""
    w = _groups(weight.float(), group_size)
    if scheme == "sym":
        pick = w.abs().argmax(dim=-1, keepdim=True)
        scale = _stored(w.gather(-1, pick) / -SYMMETRIC_ZERO, dtype)
        zero = torch.full_like(scale, float(SYMMETRIC_ZERO))
    else:
        low = w.amin(dim=-1, keepdim=True).clamp(max=0.0)
        high = w.amax(dim=-1, keepdim=True).clamp(min=0.0)
        scale = _stored((high - low) / 15.0, dtype)
        zero = (-low / scale).round().clamp(0, 15)
    q = ((w / scale).round() + zero).clamp(0, 15)
    return q, scale, zero


def _stored(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as `dtype` stores it, back in float32; 1.0 where it is (or rounds to) zero."""
    rounded = scale.to(dtype).float()
    return torch.where(rounded == 0, torch.ones_like(rounded), rounded)


def fake_quantize(weight: torch.Tensor, group_size: int, scheme: Scheme, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] -> the float32 [N, K] weight its INT4 version dequantizes to (for error measures)."""
    q, scale, zero = quantize_groups(weight, group_size, scheme, dtype)
    n, k = weight.shape
    return ((q - zero) * scale).view(n, -1)[:, :k]


def quantize_weight(weight: torch.Tensor, group_size: int, scheme: Scheme, dtype: torch.dtype) -> Int4Weight:
    """nn.Linear weight [N, K] (K a multiple of 8) -> `Int4Weight` with scales (and zeros) in `dtype`."""
    n, k = weight.shape
    q, scale, zero = quantize_groups(weight, group_size, scheme, dtype)
    q_kn = q.view(n, -1)[:, :k].t().to(torch.uint8)  # [K, N]
    scales = scale.squeeze(-1).t().contiguous().to(dtype)  # [G, N]
    zeros = None if scheme == "sym" else zero.squeeze(-1).t().contiguous().to(dtype)
    return Int4Weight(pack_int4(q_kn).contiguous(), scales, zeros, group_size)
