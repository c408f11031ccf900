"""Calibration for activation-aware quantization: token samples, and a dense float32 forward over the
engine model's weights that exposes every decoder layer's projection inputs.

The forward reads weights by their checkpoint module names (`self_attn.qkv_proj` or `q_proj`/`k_proj`/
`v_proj`, `o_proj`, `mlp.gate_up_proj` or `gate_proj`/`up_proj`, `down_proj`, the norms' `weight` and
`eps`) and computes each sample alone with causal attention: it needs no KV cache and does not depend
on how the engine batches a step. It runs layer by layer, holding only the hidden states between layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import terse
from terse.backend.local.models.llama import LlamaForCausalLM, ModelConfig, rope_inv_freq
from terse.errors import ConfigError

from .config import QuantizationConfig

SAMPLE_DOCUMENTS = Path(terse.__file__).parent / "pipelines" / "sample_data" / "documents"
"""The bundled sample's documents: the default calibration text."""
PIECE_TOKENS = 512
"""Longest calibration sample (texts are cut into pieces of this many tokens)."""


def calibration_texts(config: QuantizationConfig) -> list[str]:
    """The configured prompts, else the bundled sample's documents."""
    if config.calibration_prompts:
        return list(config.calibration_prompts)
    files = sorted(SAMPLE_DOCUMENTS.glob("*")) if SAMPLE_DOCUMENTS.is_dir() else []
    texts = [f.read_text(encoding="utf-8") for f in files if f.is_file()]
    if not texts:
        raise ConfigError(
            "AWQ calibration found no bundled sample documents in this installation; give "
            "quantization calibration_prompts (a few texts like the model's inputs) or set awq=False"
        )
    return texts


def calibration_samples(config: QuantizationConfig, tokenizer: Any, device: torch.device) -> list[torch.Tensor]:
    """Token id tensors [L <= PIECE_TOKENS] (int64 on `device`), `config.calibration_tokens` in total at most."""
    from terse.backend.tokenization import encode_prompt

    if tokenizer is None:
        raise ConfigError(
            "AWQ calibration needs the model's tokenizer; this model was built without one "
            "(set quantization awq=False for round-to-nearest)"
        )
    samples: list[torch.Tensor] = []
    budget = config.calibration_tokens
    for text in calibration_texts(config):
        ids = encode_prompt(tokenizer, text)
        for start in range(0, len(ids), PIECE_TOKENS):
            piece = ids[start : start + PIECE_TOKENS][:budget]
            if len(piece) >= 2:
                samples.append(torch.tensor(piece, dtype=torch.int64, device=device))
                budget -= len(piece)
            if budget < 2:
                return samples
    return samples


@dataclass
class LayerInputs:
    """The inputs of one decoder layer's projections over all calibration tokens (float32)."""

    attn_in: torch.Tensor
    """[T, hidden]: q/k/v projections' input (after the input norm)."""
    attn_out: torch.Tensor
    """[T, heads * head_dim]: o_proj's input."""
    mlp_in: torch.Tensor
    """[T, hidden]: gate/up projections' input (after the post-attention norm)."""
    mlp_act: torch.Tensor
    """[T, intermediate]: down_proj's input, silu(gate) * up."""


class CalibrationForward:
    """Hidden states of the calibration samples, advanced one decoder layer at a time."""

    def __init__(self, model: LlamaForCausalLM, samples: list[torch.Tensor]) -> None:
        if not samples:
            raise ConfigError("AWQ calibration got no tokens; give longer calibration_prompts")
        self.config: ModelConfig = model.config
        device = samples[0].device
        with torch.no_grad():
            self.hidden = [model.model.embed_tokens(ids).float() for ids in samples]  # [L_i, hidden] each
        inv_freq = rope_inv_freq(self.config).to(device)
        longest = max(len(ids) for ids in samples)
        freqs = torch.arange(longest, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()  # [longest, head_dim]

    @torch.no_grad()
    def step(self, layer: nn.Module) -> LayerInputs:
        """Inputs of `layer`'s projections for every sample (concatenated); the hidden states move on to
        the layer's outputs. Scales folded into the layer afterwards leave its function unchanged, so
        the next layer's inputs do not depend on them."""
        results = [self._layer(layer, h) for h in self.hidden]
        self.hidden = [out for out, _ in results]
        return LayerInputs(*(torch.cat([parts[i] for _, parts in results]) for i in range(4)))

    def _layer(self, layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        attn_in = rms_norm(x, layer.input_layernorm)
        attn_out = self._attention(layer.self_attn, attn_in)
        h = x + linear(layer.self_attn.o_proj, attn_out)
        mlp_in = rms_norm(h, layer.post_attention_layernorm)
        gate, up = gate_up(layer.mlp, mlp_in)
        act = F.silu(gate) * up
        out = h + linear(layer.mlp.down_proj, act)
        return out, (attn_in, attn_out, mlp_in, act)

    def _attention(self, attn: Any, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        length = x.shape[0]
        q, k, v = qkv(attn, x, c)
        q = q.view(length, c.num_heads, c.head_dim)
        k = k.view(length, c.num_kv_heads, c.head_dim)
        v = v.view(length, c.num_kv_heads, c.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = rms_norm(q, attn.q_norm), rms_norm(k, attn.k_norm)
        cos, sin = self.cos[:length, None, :], self.sin[:length, None, :]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        group = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        return out.transpose(0, 1).reshape(length, c.num_heads * c.head_dim)


def rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """float32 RMSNorm with the module's `weight` and `eps`."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.float()


def linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """A dense projection in float32 (the module's weight cast)."""
    bias = None if module.bias is None else module.bias.float()
    return F.linear(x, module.weight.float(), bias)


def qkv(attn: Any, x: torch.Tensor, c: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if getattr(attn, "qkv_proj", None) is not None:
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q, k, v = linear(attn.qkv_proj, x).split([q_dim, kv_dim, kv_dim], dim=-1)
        return q, k, v
    return linear(attn.q_proj, x), linear(attn.k_proj, x), linear(attn.v_proj, x)


def gate_up(mlp: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if getattr(mlp, "gate_up_proj", None) is not None:
        gate, up = linear(mlp.gate_up_proj, x).chunk(2, dim=-1)
        return gate, up
    return linear(mlp.gate_proj, x), linear(mlp.up_proj, x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
