"""GPTQ and AWQ checkpoints, read without their libraries: each quantized projection's tensors are
converted to terse's INT4 layout (terse.kernels.w4a16_layout) as the checkpoint loads.

GPTQ (`quant_method: "gptq"`), per projection `P` with K inputs, N outputs, G groups:

    P.qweight  int32 [K / 8, N]   nibble j of word [r, n] = q[8r + j, n]           (terse's own packing)
    P.qzeros   int32 [G, N / 8]   nibble j of word [g, c] = stored zero of column 8c + j
    P.scales   fp16  [G, N]
    P.g_idx    int32 [K]          group of input row k (k // group_size unless act-order)
    W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])
    zero = stored + 1 in the original format (`checkpoint_format` "gptq"), stored as is in "gptq_v2".

  Act-order (`desc_act`) checkpoints quantized the rows in another order, so g_idx is not sorted; the
  rows are reordered by group (a stable sort of g_idx) and kept with the permutation, which the layer
  applies to its input: x[:, perm] @ W[perm] = x @ W.

AWQ (`quant_method: "awq"`, `version: "gemm"`, zero points), per projection:

    P.qweight  int32 [K, N / 8]   nibble i of word [k, c] = q[k, 8c + ORDER[i]], ORDER = 0 2 4 6 1 3 5 7
    P.qzeros   int32 [G, N / 8]   the same interleaved packing of the zero points
    P.scales   fp16  [G, N]       W[k, n] = scales[k // group_size, n] * (q[k, n] - zero[k // group_size, n])
"""

from __future__ import annotations

from typing import Any

import torch

from terse.errors import ModelLoadError
from terse.kernels.w4a16_layout import PACK, SYMMETRIC_ZERO, Int4Weight, pack_int4, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""Column offset (within 8) held by nibble i of an AWQ GEMM word."""


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, C, 8]: nibble i of every word at [..., i]."""
    shifts = torch.arange(PACK, device=words.device, dtype=torch.int32) * 4
    return (words[..., None] >> shifts) & 0xF


def _setting(qc: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in qc:
            return qc[name]
    return default


def _check_bits(qc: dict[str, Any], method: str) -> None:
    bits = _setting(qc, "bits", "w_bit", default=4)
    if bits != 4:
        raise ModelLoadError(f"{method} checkpoint has bits={bits}; terse loads 4-bit checkpoints only")


def _group_size(qc: dict[str, Any], in_features: int, method: str) -> int:
    size = int(_setting(qc, "group_size", "q_group_size", default=128))
    size = in_features if size <= 0 else size  # -1: one group per column (per-channel scales)
    if size % PACK:
        raise ModelLoadError(f"{method} group_size={size} is not a multiple of 8; terse cannot load it")
    return size


def _zeros_or_none(zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Zero points in `dtype`, or None when every one is the symmetric 8."""
    if bool((zeros == SYMMETRIC_ZERO).all()):
        return None
    return zeros.to(dtype).contiguous()


def gptq_weight(tensors: dict[str, torch.Tensor], prefix: str, qc: dict[str, Any], dtype: torch.dtype) -> Int4Weight:
    """The projection `prefix` of a GPTQ checkpoint in terse's layout."""
    _check_bits(qc, "GPTQ")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ModelLoadError(f"GPTQ checkpoint_format={fmt!r} is not supported; terse reads 'gptq' and 'gptq_v2'")
    qweight = tensors[f"{prefix}.qweight"].to(torch.int32)
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    group_size = _group_size(qc, k, "GPTQ")
    zeros = _nibbles(tensors[f"{prefix}.qzeros"].to(torch.int32)).reshape(-1, n)  # [G, N]
    if fmt == "gptq":
        zeros = zeros + 1
    scales = tensors[f"{prefix}.scales"].to(dtype).contiguous()
    g_idx = tensors.get(f"{prefix}.g_idx")
    in_order = torch.arange(k, device=qweight.device) // group_size
    perm = None
    if g_idx is not None and not torch.equal(g_idx.to(in_order.dtype), in_order):
        perm = torch.argsort(g_idx.to(torch.int64), stable=True)
        if not torch.equal(g_idx.to(torch.int64)[perm], in_order):
            raise ModelLoadError(
                f"{prefix}.g_idx does not give every group exactly {group_size} rows; the checkpoint's "
                f"act-order layout is not one terse can reorder"
            )
        qweight = pack_int4(unpack_int4(qweight)[perm])
    return Int4Weight(qweight.contiguous(), scales, _zeros_or_none(zeros, dtype), group_size, perm)


def awq_weight(tensors: dict[str, torch.Tensor], prefix: str, qc: dict[str, Any], dtype: torch.dtype) -> Int4Weight:
    """The projection `prefix` of an AWQ (GEMM) checkpoint in terse's layout."""
    _check_bits(qc, "AWQ")
    version = str(_setting(qc, "version", default="gemm")).lower()
    if version != "gemm":
        raise ModelLoadError(f"AWQ version={version!r} is not supported; terse reads the 'gemm' packing")
    if not _setting(qc, "zero_point", default=True):
        raise ModelLoadError("AWQ checkpoints without zero points are not supported (zero_point must be true)")
    packed = tensors[f"{prefix}.qweight"].to(torch.int32)  # [K, N / 8]
    group_size = _group_size(qc, packed.shape[0], "AWQ")
    q = _awq_columns(packed)  # [K, N]
    zeros = _awq_columns(tensors[f"{prefix}.qzeros"].to(torch.int32))  # [G, N]
    scales = tensors[f"{prefix}.scales"].to(dtype).contiguous()
    return Int4Weight(pack_int4(q).contiguous(), scales, _zeros_or_none(zeros, dtype), group_size)


def _awq_columns(words: torch.Tensor) -> torch.Tensor:
    """AWQ-packed int32 [R, N / 8] -> int32 [R, N] in natural column order."""
    nibbles = _nibbles(words)  # [R, N / 8, 8]: nibble i holds column 8c + AWQ_ORDER[i]
    out = torch.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles
    return out.reshape(words.shape[0], -1)


def terse_weight(tensors: dict[str, torch.Tensor], prefix: str, qc: dict[str, Any], dtype: torch.dtype) -> Int4Weight:
    """The projection `prefix` of a terse-quantized checkpoint (already in terse's layout)."""
    zeros = tensors.get(f"{prefix}.zeros")
    perm = tensors.get(f"{prefix}.input_perm")
    return Int4Weight(
        tensors[f"{prefix}.qweight"].to(torch.int32).contiguous(),
        tensors[f"{prefix}.scales"].to(dtype).contiguous(),
        None if zeros is None else zeros.to(dtype).contiguous(),
        int(qc["group_size"]),
        None if perm is None else perm.to(torch.int64),
    )


CONVERTERS = {"gptq": gptq_weight, "awq": awq_weight, "terse": terse_weight}
"""quant_method -> the function reading one projection in terse's layout."""
