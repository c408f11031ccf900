"""`quantize_model`: the INT4 transform of a loaded (dense) model, applied in place.

Like every optimization of the engine's model, it is a transform of a plain model: the decoder's
nn.Linear modules are replaced by `Int4Linear` (and, when asked, the LM head and the embeddings), after
AWQ has folded its activation-aware scales into the dense weights. The model's forward is unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from terse.backend.local.models.llama import LlamaForCausalLM
from terse.errors import ConfigError

from .awq import ScaleChoice, apply_awq
from .calibration import calibration_samples
from .config import QuantizationConfig
from .modules import Int4Embedding, Int4Linear, weight_bytes
from .rtn import quantize_weight


@dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_model` did."""

    config: QuantizationConfig
    num_linear_layers: int
    """Linear layers replaced (the LM head included when quantized)."""
    bytes_before: int
    """Parameter and buffer bytes of the model before."""
    bytes_after: int
    """... and after."""
    seconds: float
    """Wall time of calibration, search and quantization."""
    awq: list[ScaleChoice] = field(default_factory=list)
    """Per layer and projection group: the chosen AWQ exponent and the output errors (empty without AWQ)."""


def model_dtype(model: LlamaForCausalLM) -> torch.dtype:
    """The activation dtype of the model (its final norm's)."""
    return model.model.norm.weight.dtype


def quantize_model(model: LlamaForCausalLM, config: QuantizationConfig, *, tokenizer: Any = None) -> QuantizationReport:
    """Quantize `model` in place as `config` says; AWQ calibrates on `tokenizer`-encoded texts."""
    start = time.perf_counter()
    before = weight_bytes(model)
    dtype = model_dtype(model)
    device = model.model.norm.weight.device
    choices: list[ScaleChoice] = []
    if config.awq:
        choices = apply_awq(model, calibration_samples(config, tokenizer, device), config)
    count = 0
    for layer in model.decoder_layers:
        count += _replace_linears(layer, config, dtype)
    count += _quantize_vocab(model, config, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return QuantizationReport(config, count, before, weight_bytes(model), time.perf_counter() - start, choices)


def _replace_linears(root: nn.Module, config: QuantizationConfig, dtype: torch.dtype) -> int:
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, quantize_linear(child, config, dtype))
                count += 1
    return count


def quantize_linear(linear: nn.Linear, config: QuantizationConfig, dtype: torch.dtype) -> Int4Linear:
    """Round-to-nearest INT4 of one dense layer (scales and zeros in `dtype`)."""
    weight = quantize_weight(linear.weight.data, config.group_size, config.scheme, dtype)
    return Int4Linear(weight, None if linear.bias is None else linear.bias.data)


def _quantize_vocab(model: LlamaForCausalLM, config: QuantizationConfig, dtype: torch.dtype) -> int:
    """Embeddings and LM head; a tied pair quantized together shares one packed weight."""
    embed = model.model.embed_tokens
    head = model.lm_head
    tied = isinstance(embed, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embed.weight
    count = 0
    if config.embeddings and isinstance(embed, nn.Embedding):
        packed = quantize_weight(embed.weight.data, config.group_size, config.scheme, dtype)
        model.model.embed_tokens = Int4Embedding(packed)  # type: ignore[assignment]
        if config.lm_head and tied:
            model.lm_head = Int4Linear(packed)  # type: ignore[assignment]
            return 1
    if config.lm_head and isinstance(head, nn.Linear):
        model.lm_head = quantize_linear(head, config, dtype)  # type: ignore[assignment]
        count = 1
    return count


def apply_quantization(
    model: LlamaForCausalLM, quantization: QuantizationConfig | None, *, tokenizer: Any = None
) -> QuantizationReport | None:
    """The engine's load-time hook: quantize a dense model as configured. A model loaded from a
    pre-quantized checkpoint stays as it is (its group size must match a configured one); None: no-op."""
    if quantization is None:
        return None
    stored = {m.group_size for m in model.modules() if isinstance(m, Int4Linear | Int4Embedding)}
    if stored:
        if stored != {quantization.group_size}:
            raise ConfigError(
                f"the checkpoint is already quantized with group size {sorted(stored)}, but quantization asks "
                f"group_size={quantization.group_size}; drop the quantization option or match the group size"
            )
        return None
    return quantize_model(model, quantization, tokenizer=tokenizer)
