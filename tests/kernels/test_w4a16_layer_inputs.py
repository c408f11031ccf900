"""A decode layer's INT4 projections with the norm and the SiLU-and-multiply taken into their kernel
(Triton's interpreter standing in for CUDA): the model's `norm_project` and `MLP.forward` give the
separate launches' results with fewer launches, and fall back to them where the product's plan cannot."""

from __future__ import annotations

import pytest
import torch

import tests.kernels  # noqa: F401  (switches Triton's interpreter on before triton loads)
from terse.backend.local.models.llama import MLP, ModelConfig, RMSNorm, norm_project
from terse.backend.local.models.ops import TritonOps
from terse.backend.local.quant import modules
from terse.backend.local.quant.modules import Int4Linear
from terse.backend.local.quant.rtn import quantize_weight
from terse.kernels import w4a16
from tests.kernels.helpers import rel_err

DTYPE = torch.float16  # the interpreter truncates bfloat16; the GPU check covers it (bench/quantization.py)


class CountingOps(TritonOps):
    """The Triton ops, counting the separate norm and activation launches."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = self.activations = 0

    def rms_norm(self, x, residual, weight, eps):
        self.norms += 1
        return super().rms_norm(x, residual, weight, eps)

    def silu_mul(self, gate_up):
        self.activations += 1
        return super().silu_mul(gate_up)


def _int4(out_features: int, in_features: int, seed: int) -> Int4Linear:
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) / in_features**0.5
    return Int4Linear(quantize_weight(w, 32, "asym", DTYPE))


def _config() -> ModelConfig:
    return ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
                                     "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4})


@pytest.fixture
def kernels_in_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modules, "kernels_run_on", lambda x: True)
    monkeypatch.setattr(w4a16, "_PLANS", {})  # heuristic plans: column GEMVs, one K slice at these sizes


def _mlp() -> tuple[MLP, RMSNorm]:
    mlp = MLP(_config(), "cpu", DTYPE)
    mlp.fuse()
    mlp.gate_up_proj = _int4(192, 64, 1)  # type: ignore[assignment]
    mlp.down_proj = _int4(64, 96, 2)  # type: ignore[assignment]
    norm = RMSNorm(64, 1e-5, "cpu", DTYPE)
    norm.weight.data = (1 + 0.2 * torch.randn(64, generator=torch.Generator().manual_seed(3))).to(DTYPE)
    return mlp, norm


def test_mlp_of_one_row_launches_no_norm_or_activation(kernels_in_interpreter: None) -> None:
    mlp, norm = _mlp()
    gen = torch.Generator().manual_seed(4)
    x, residual = torch.randn(1, 64, generator=gen).to(DTYPE), torch.randn(1, 64, generator=gen).to(DTYPE)
    ops = CountingOps()
    out, stream = mlp(x, residual, norm, ops)
    assert (ops.norms, ops.activations) == (0, 0)
    h, want_stream = ops.rms_norm(x, residual, norm.weight, norm.eps)  # the separate launches
    want = mlp.down_proj(ops.silu_mul(mlp.gate_up_proj(h)))
    assert torch.equal(stream, want_stream)
    assert rel_err(out, want) < 5e-3  # the fused norm does not round its output to float16 first


def test_rows_beyond_one_keep_the_separate_launches(kernels_in_interpreter: None) -> None:
    mlp, norm = _mlp()
    x = torch.randn(3, 64).to(DTYPE)
    ops = CountingOps()
    mlp(x, x.clone(), norm, ops)
    assert (ops.norms, ops.activations) == (1, 1)


def test_norm_project_falls_back_without_the_kernels() -> None:
    proj, norm = _int4(48, 64, 5), RMSNorm(64, 1e-5, "cpu", DTYPE)
    x = torch.randn(1, 64).to(DTYPE)
    ops = CountingOps()
    out, stream = norm_project(proj, x, None, norm, ops)  # CPU: the torch reference product
    assert ops.norms == 1 and stream is x and out.shape == (1, 48)
