"""Activation-aware scale search (AWQ): per-input-channel scales that protect the channels carrying
large activations, folded into the model so the quantized model runs with no extra operation.

For a group of projections sharing one input x [T, K] (q/k/v; gate/up; o_proj; down_proj) with
stacked weight W [N, K], a scale s [K] turns x @ W^T into (x / s) @ (W * s)^T: the same product in
exact arithmetic, but quantizing W * s rounds the channels with large s (large activations) more
finely. Candidates on a grid of exponents alpha:

    s = mean|x|^alpha / (mean normalized |W|)^(1 - alpha),  normalised so max(s) * min(s) = 1

each scored by the group's output error || x @ Q(W * s)^T / s - x @ W^T ||^2 on the calibration tokens
(Q: round-to-nearest INT4 of the configured group size and scheme); s = 1 (plain round-to-nearest) is
always a candidate, so the search never does worse than it on the calibration data. The winner is
folded in: W *= s on the group's input channels, and 1 / s into what produces x:

    q/k/v      <- input_layernorm.weight         gate/up    <- post_attention_layernorm.weight
    o_proj     <- v_proj output rows (only when there is no GQA: every o input channel has its own v row)
    down_proj  <- up_proj output rows (and bias)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from terse.backend.local.models.llama import LlamaForCausalLM, ModelConfig

from .calibration import CalibrationForward, LayerInputs
from .config import QuantizationConfig, Scheme
from .rtn import fake_quantize


@dataclass(frozen=True)
class ScaleChoice:
    """The outcome of one search."""

    layer: int
    """Decoder layer index."""
    group: str
    """"qkv", "o", "gate_up" or "down"."""
    alpha: float | None
    """Chosen exponent; None when plain round-to-nearest (s = 1) won."""
    rtn_error: float
    """Mean squared output error of round-to-nearest on the calibration tokens."""
    error: float
    """The same with the chosen scales (<= rtn_error)."""


def search_scale(
    x: torch.Tensor, weight: torch.Tensor, config: QuantizationConfig, dtype: torch.dtype
) -> tuple[torch.Tensor, float | None, float, float]:
    """x: [T, K], weight: [N, K] (float32) -> (s [K], alpha or None, error with s = 1, error with s)."""
    reference = x @ weight.t()  # [T, N]
    x_mean = x.abs().mean(dim=0)
    w_mean = _normalized_weight_mean(weight, config.group_size)
    scheme: Scheme = config.scheme

    def error(s: torch.Tensor) -> float:
        quantized = fake_quantize(weight * s, config.group_size, scheme, dtype) / s
        return float((x @ quantized.t() - reference).pow(2).mean())

    ones = torch.ones_like(x_mean)
    rtn_error = error(ones)
    best, best_alpha, best_error = ones, None, rtn_error
    for i in range(config.awq_grid):
        alpha = i / config.awq_grid
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        e = error(s)
        if e < best_error:
            best, best_alpha, best_error = s, alpha, e
    return best, best_alpha, rtn_error, best_error


def _normalized_weight_mean(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| divided by its group's max |W|: [N, K] -> [K]."""
    n, k = weight.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(weight.abs(), (0, groups * group_size - k)).view(n, groups, group_size)
    normalized = padded / padded.amax(dim=-1, keepdim=True).clamp(min=1e-12)
    return normalized.view(n, -1)[:, :k].mean(dim=0)


@torch.no_grad()
def apply_awq(model: LlamaForCausalLM, samples: list[torch.Tensor], config: QuantizationConfig) -> list[ScaleChoice]:
    """Search and fold scales into every decoder layer's dense weights (in place), layer by layer."""
    forward = CalibrationForward(model, samples)
    dtype = model.model.norm.weight.dtype
    choices: list[ScaleChoice] = []
    for index, layer in enumerate(model.decoder_layers):
        choices += _fold_layer(index, layer, forward.step(layer), model.config, config, dtype)
    return choices


def _fold_layer(
    index: int, layer: Any, inputs: LayerInputs, c: ModelConfig, config: QuantizationConfig, dtype: torch.dtype
) -> list[ScaleChoice]:
    attn, mlp = layer.self_attn, layer.mlp
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    choices: list[ScaleChoice] = []

    def fold(name: str, x: torch.Tensor, targets: list[nn.Linear], divide: Callable[[torch.Tensor], None]) -> None:
        stacked = torch.cat([t.weight.float() for t in targets])
        s, alpha, rtn_error, error = search_scale(x, stacked, config, dtype)
        for target in targets:
            _scale_columns(target, s)
        divide(s)
        choices.append(ScaleChoice(index, name, alpha, rtn_error, error))

    qkv = _group(attn, "qkv_proj", ("q_proj", "k_proj", "v_proj"))
    fold("qkv", inputs.attn_in, qkv, lambda s: _divide_(layer.input_layernorm.weight, s))
    if c.num_heads == c.num_kv_heads:
        v_rows = _rows(attn, "qkv_proj", "v_proj", q_dim + kv_dim, kv_dim)
        fold("o", inputs.attn_out, [attn.o_proj], lambda s: _divide_rows(v_rows, s))
    gate_up = _group(mlp, "gate_up_proj", ("gate_proj", "up_proj"))
    fold("gate_up", inputs.mlp_in, gate_up, lambda s: _divide_(layer.post_attention_layernorm.weight, s))
    up_rows = _rows(mlp, "gate_up_proj", "up_proj", c.intermediate_size, c.intermediate_size)
    fold("down", inputs.mlp_act, [mlp.down_proj], lambda s: _divide_rows(up_rows, s))
    return choices


def _group(parent: Any, fused: str, names: tuple[str, ...]) -> list[nn.Linear]:
    module = getattr(parent, fused, None)
    return [module] if module is not None else [getattr(parent, n) for n in names]


def _rows(parent: Any, fused: str, name: str, start: int, size: int) -> tuple[nn.Linear, slice]:
    """The output rows of projection `name` inside the fused one if there is one."""
    module = getattr(parent, fused, None)
    if module is not None:
        return module, slice(start, start + size)
    return getattr(parent, name), slice(0, size)


def _scale_columns(linear: nn.Linear, s: torch.Tensor) -> None:
    w = linear.weight
    w.data = (w.data.float() * s[None, :]).to(w.dtype)


def _divide_(weight: torch.Tensor, s: torch.Tensor) -> None:
    weight.data = (weight.data.float() / s).to(weight.dtype)


def _divide_rows(target: tuple[nn.Linear, slice], s: torch.Tensor) -> None:
    linear, rows = target
    w = linear.weight.data
    w[rows] = (w[rows].float() / s[:, None]).to(w.dtype)
    if linear.bias is not None:
        b = linear.bias.data
        b[rows] = (b[rows].float() / s).to(b.dtype)
