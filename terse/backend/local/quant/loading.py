"""Loading pre-quantized checkpoints (GPTQ, AWQ, terse) into the engine's model.

A checkpoint is pre-quantized when its config.json holds a `quantization_config`. Every projection
with a `.qweight` tensor becomes an `Int4Linear` (its layout converted by `external.CONVERTERS`), the
rest loads densely, and q/k/v and gate/up are fused as the dense loader fuses them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from terse.backend.local.models.llama import LlamaForCausalLM, ModelConfig
from terse.errors import ModelLoadError

from .external import CONVERTERS
from .modules import Int4Embedding, Int4Linear, concat_linears

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def read_quantization_config(model_dir: Path) -> dict[str, Any] | None:
    """config.json's `quantization_config`, or None for a dense checkpoint."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # read_model_config reports these
    qc = raw.get("quantization_config")
    return dict(qc) if isinstance(qc, dict) else None


def load_prequantized_model(
    model_dir: Path, config: ModelConfig, *, device: torch.device, dtype: torch.dtype
) -> LlamaForCausalLM | None:
    """The model of a pre-quantized checkpoint on `device` (activations, scales and dense weights in
    `dtype`), fused; None when the checkpoint is dense."""
    qc = read_quantization_config(model_dir)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    convert = CONVERTERS.get(method)
    if convert is None:
        raise ModelLoadError(
            f"{str(model_dir)!r} is quantized with quant_method={method!r}, which the local engine does not "
            f"read (it reads {', '.join(sorted(CONVERTERS))}); run it with an 'hf:<path>' spec"
        )
    tensors = _read_tensors(model_dir, device)
    model = LlamaForCausalLM(config, device="meta", dtype=dtype)
    for parent_name, name in _projections(config):
        prefix = f"{parent_name}.{name}" if parent_name else name
        if f"{prefix}.qweight" not in tensors:
            continue
        try:
            weight = convert(tensors, prefix, qc, dtype)
        except KeyError as e:
            raise ModelLoadError(f"{str(model_dir)!r}: quantized projection {prefix!r} lacks tensor {e}") from e
        bias = tensors.get(f"{prefix}.bias")
        layer = Int4Linear(weight, None if bias is None else bias.to(dtype))
        setattr(model.get_submodule(parent_name) if parent_name else model, name, layer)
    if "model.embed_tokens.qweight" in tensors:
        model.model.embed_tokens = Int4Embedding(convert(tensors, "model.embed_tokens", qc, dtype))  # type: ignore[assignment]
    _load_dense(model, tensors, dtype, model_dir)
    _fuse(model)
    return model.eval()


def _read_tensors(model_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{str(model_dir)!r} holds no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file), device=str(device)))
    return tensors


def _projections(config: ModelConfig) -> list[tuple[str, str]]:
    names = [("", "lm_head")]
    for i in range(config.num_layers):
        names += [(f"model.layers.{i}.self_attn", p) for p in ATTENTION_PROJECTIONS]
        names += [(f"model.layers.{i}.mlp", p) for p in MLP_PROJECTIONS]
    return names


def _load_dense(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor], dtype: torch.dtype, model_dir: Path) -> None:
    wanted = [name for name, p in model.named_parameters() if p.is_meta]
    state = {name: tensors[name].to(dtype) for name in wanted if name in tensors}
    model.load_state_dict(state, strict=False, assign=True)
    head = model.lm_head
    if isinstance(head, nn.Linear) and head.weight.is_meta and model.config.tie_word_embeddings:
        embed = model.model.embed_tokens
        if isinstance(embed, Int4Embedding):
            model.lm_head = Int4Linear(embed.int4)  # type: ignore[assignment]
        else:
            head.weight = embed.weight
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ModelLoadError(
            f"{str(model_dir)!r} lacks {len(missing)} weights the {model.config.architecture} layout needs "
            f"(first: {missing[:3]}); the checkpoint is incomplete or of another architecture"
        )


def _fuse(model: LlamaForCausalLM) -> None:
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj, as the dense loader's `model.fuse()` does."""
    for layer in model.decoder_layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])  # type: ignore[assignment]
        del attn.q_proj, attn.k_proj, attn.v_proj
        mlp.gate_up_proj = concat_linears([mlp.gate_proj, mlp.up_proj])  # type: ignore[assignment]
        del mlp.gate_proj, mlp.up_proj
