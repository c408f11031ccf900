"""The per-layer elementwise work of the model, behind one small interface with two implementations:

- `TorchOps`: the torch references (terse.kernels.decode_reference), op for op what transformers
  computes: the path on CPU and in float32, where greedy output must equal transformers token for token;
- `TritonOps`: the fused Triton kernels (residual add + RMSNorm, RoPE + KV write, SiLU-and-multiply):
  a decode layer launches about ten kernels instead of forty. bfloat16 / float16 on CUDA. An INT4 q/k/v
  projection of one row takes RoPE + KV write into its own launch (`project_rope_store`), and a norm
  before an INT4 product of one row can write that product's input side (`rms_norm_prep`, a `RowPrep`).

`choose_ops` picks one when the engine is built; the model never branches on the device.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from terse.backend.local.quant.modules import Int4Linear
from terse.kernels.decode_reference import (
    add_rms_norm_reference,
    rms_norm_reference,
    rope_store_reference,
    silu_mul_reference,
)
from terse.kernels.row_prep import RowPrep, row_prep_reference


class RopeTables(Protocol):
    cos: torch.Tensor
    """[max_len, D] float32."""
    sin: torch.Tensor


class LayerOps(Protocol):
    def prepare_rope(self, tables: RopeTables, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        """Once per step: what `rope_store` needs for the step's positions [T]."""
        ...

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, N] -> (norm(x + residual), x + residual); residual None -> (norm(x), x)."""
        ...

    def rms_norm_prep(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, span: int
    ) -> tuple[torch.Tensor, torch.Tensor, RowPrep]:
        """`rms_norm` of one row x [1, N], with the normed row's `RowPrep` (sums per `span` inputs) for the
        INT4 product that follows."""
        ...

    def rope_store(
        self, rope: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q [T, H, D], k [T, KVH, D]; write k, v into layer_kv at slot_mapping. -> (q, k)."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] -> [T, I]."""
        ...

    def project_rope_store(
        self, proj: nn.Module, x: torch.Tensor, rope: Any, layer_kv: torch.Tensor, slot_mapping: torch.Tensor,
        num_heads: int, num_kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The fused q/k/v projection proj(x) with `rope_store` in one launch where proj's kernel allows it:
        (q [T, H, D], k [T, KVH, D] rotated, v [T, KVH, D]), k and v written into layer_kv; else None (the
        model projects, then calls `rope_store`)."""
        ...


class TorchOps:
    """The reference path (any device and dtype)."""

    def prepare_rope(self, tables: RopeTables, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        # cos, sin: [T, 1, D] in the model dtype, looked up once per step
        return tables.cos[positions].to(dtype)[:, None, :], tables.sin[positions].to(dtype)[:, None, :]

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rms_norm_reference(x, weight, eps), x
        return add_rms_norm_reference(x, residual, weight, eps)

    def rms_norm_prep(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, span: int
    ) -> tuple[torch.Tensor, torch.Tensor, RowPrep]:
        out, res = self.rms_norm(x, residual, weight, eps)
        return out, res, row_prep_reference(out, span)

    def rope_store(
        self, rope: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope
        return rope_store_reference(q, k, v, cos, sin, layer_kv, slot_mapping)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_mul_reference(gate_up)

    def project_rope_store(
        self, proj: nn.Module, x: torch.Tensor, rope: Any, layer_kv: torch.Tensor, slot_mapping: torch.Tensor,
        num_heads: int, num_kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        return None


class TritonOps:
    """The fused kernels (CUDA; bfloat16 / float16)."""

    def __init__(self) -> None:
        from terse.kernels.activation import silu_mul_triton
        from terse.kernels.norm import add_rms_norm_prep_triton, add_rms_norm_triton
        from terse.kernels.rope_store import rope_store_triton

        self._norm, self._rope, self._silu = add_rms_norm_triton, rope_store_triton, silu_mul_triton
        self._norm_prep = add_rms_norm_prep_triton

    def prepare_rope(self, tables: RopeTables, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        return tables.cos, tables.sin, positions

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._norm(x, residual, weight, eps)

    def rms_norm_prep(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, span: int
    ) -> tuple[torch.Tensor, torch.Tensor, RowPrep]:
        return self._norm_prep(x, residual, weight, eps, span)

    def rope_store(
        self, rope: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin, positions = rope
        return self._rope(q, k, v, cos, sin, positions, layer_kv, slot_mapping)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._silu(gate_up)

    def project_rope_store(
        self, proj: nn.Module, x: torch.Tensor, rope: Any, layer_kv: torch.Tensor, slot_mapping: torch.Tensor,
        num_heads: int, num_kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if not isinstance(proj, Int4Linear):
            return None
        cos, sin, positions = rope
        return proj.rope_store_forward(x, cos, sin, positions, layer_kv, slot_mapping, num_heads, num_kv_heads)


def choose_ops(device: torch.device, dtype: torch.dtype, head_dim: int) -> LayerOps:
    """Triton kernels for half-precision models on CUDA (head dims the RoPE kernel takes), else torch."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_dim >= 16 and not head_dim & (head_dim - 1):
        return TritonOps()
    return TorchOps()
