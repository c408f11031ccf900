"""The MLP's SiLU-and-multiply after an INT4 fused gate/up projection: taken from the product's own
launch where the layer's kernel allows it (the kernel itself is tested in tests/kernels), else applied
by the model's ops to the plain product."""

from __future__ import annotations

import pytest
import torch

from terse.backend.local.models.llama import _gate_up_activation
from terse.backend.local.models.ops import TorchOps
from terse.backend.local.quant.modules import Int4Linear
from terse.backend.local.quant.rtn import quantize_weight


def _gate_up_layer(inner: int = 24, hidden: int = 64) -> Int4Linear:
    torch.manual_seed(0)
    return Int4Linear(quantize_weight(torch.randn(2 * inner, hidden) / hidden**0.5, 32, "asym", torch.float32))


def test_on_the_cpu_the_ops_apply_the_activation_to_the_product() -> None:
    layer, ops = _gate_up_layer(), TorchOps()
    x = torch.randn(1, 64)
    assert layer.silu_mul_forward(x) is None  # no Triton kernel for CPU tensors
    assert torch.equal(_gate_up_activation(layer, x, ops), ops.silu_mul(layer(x)))


def test_the_layer_s_own_activation_is_used_when_its_kernel_gives_one(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, ops = _gate_up_layer(), TorchOps()
    x = torch.randn(1, 64)
    fused = ops.silu_mul(layer(x)).clone()
    calls: list[torch.Tensor] = []

    def from_kernel(self: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        return fused

    monkeypatch.setattr(Int4Linear, "silu_mul_forward", from_kernel)
    assert _gate_up_activation(layer, x, ops) is fused and calls == [x]
    dense = torch.nn.Linear(64, 48)  # not INT4: the ops path
    assert torch.equal(_gate_up_activation(dense, x, ops), ops.silu_mul(dense(x))) and len(calls) == 1
