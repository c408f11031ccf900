"""Saving a quantized model: terse-quantized safetensors, or its dequantized dense equivalent.

A terse-quantized checkpoint is a Hugging Face model directory whose config.json carries

    "quantization_config": {"quant_method": "terse", "format": "int4-k8n", "bits": 4, "group_size": 128,
                            "scheme": "asym", "awq": true, "lm_head": false, "embeddings": false}

and whose model.safetensors holds, under the checkpoint's (unfused) names, per quantized projection
`P.qweight` (int32 [K / 8, N]), `P.scales` ([G, N]), `P.zeros` ([G, N], asymmetric only), optional
`P.input_perm` and `P.bias`: terse's layout (terse.kernels.w4a16_layout) as is. Dense tensors keep
their usual names. `loading.load_prequantized_model` reads it back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from terse.backend.local.models.llama import LlamaForCausalLM
from terse.kernels.w4a16_layout import dense_weight

from .config import QuantizationConfig
from .modules import Int4Embedding, Int4Linear, split_linear

FORMAT = "int4-k8n"
"""Name of terse's layout in quantization_config (int32 words packing 8 rows of K, N contiguous)."""
_SKIPPED_FILES = ("config.json", "model.safetensors.index.json")


def checkpoint_modules(model: LlamaForCausalLM) -> list[tuple[str, nn.Module]]:
    """(checkpoint name, module) of every projection, embedding, norm and head, fused ones split back."""
    c = model.config
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out: list[tuple[str, nn.Module]] = [("model.embed_tokens", model.model.embed_tokens)]
    for i, layer in enumerate(model.decoder_layers):
        prefix = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is not None:
            parts = split_linear(attn.qkv_proj, [q_dim, kv_dim, kv_dim])
        else:
            parts = [attn.q_proj, attn.k_proj, attn.v_proj]
        out += [(f"{prefix}.self_attn.{n}", m) for n, m in zip(("q_proj", "k_proj", "v_proj"), parts)]
        out.append((f"{prefix}.self_attn.o_proj", attn.o_proj))
        for norm_name in ("q_norm", "k_norm"):
            norm = getattr(attn, norm_name, None)
            if norm is not None:
                out.append((f"{prefix}.self_attn.{norm_name}", norm))
        if mlp.gate_up_proj is not None:
            gate, up = split_linear(mlp.gate_up_proj, [c.intermediate_size] * 2)
        else:
            gate, up = mlp.gate_proj, mlp.up_proj
        out += [(f"{prefix}.mlp.gate_proj", gate), (f"{prefix}.mlp.up_proj", up), (f"{prefix}.mlp.down_proj", mlp.down_proj)]
        out += [(f"{prefix}.input_layernorm", layer.input_layernorm),
                (f"{prefix}.post_attention_layernorm", layer.post_attention_layernorm)]
    out.append(("model.norm", model.model.norm))
    if not _head_is_tied(model):
        out.append(("lm_head", model.lm_head))
    return out


def _head_is_tied(model: LlamaForCausalLM) -> bool:
    embed, head = model.model.embed_tokens, model.lm_head
    if isinstance(embed, Int4Embedding) and isinstance(head, Int4Linear):
        return head.qweight is embed.qweight
    return isinstance(embed, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is embed.weight


def quantized_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The tensors of a terse-quantized checkpoint (CPU, contiguous, unshared)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in checkpoint_modules(model):
        if isinstance(module, Int4Linear | Int4Embedding):
            w = module.int4
            tensors = {"qweight": w.qweight, "scales": w.scales, "zeros": w.zeros, "input_perm": w.input_perm,
                       "bias": getattr(module, "bias", None)}
        else:
            tensors = dict(module.named_parameters(recurse=False))
        for key, t in tensors.items():
            if t is not None:
                state[f"{name}.{key}"] = t.detach().to("cpu").contiguous().clone()
    return state


def dequantized_state_dict(model: LlamaForCausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Dense weights under the checkpoint's names: what a dense model must hold to compute exactly what
    the quantized one does (each INT4 weight dequantized in `dtype`, default the scales' dtype)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in checkpoint_modules(model):
        if isinstance(module, Int4Linear | Int4Embedding):
            state[f"{name}.weight"] = dense_weight(module.int4, dtype).cpu()
            bias = getattr(module, "bias", None)
            if bias is not None:
                state[f"{name}.bias"] = bias.detach().cpu().to(dtype or bias.dtype)
        else:
            for key, t in module.named_parameters(recurse=False):
                state[f"{name}.{key}"] = t.detach().cpu().to(dtype or t.dtype).contiguous().clone()
    return state


def save_quantized(
    model: LlamaForCausalLM, source_dir: Path, out_dir: Path, quantization: QuantizationConfig | None = None
) -> Path:
    """Write a terse-quantized checkpoint of `model` to `out_dir`: its config.json (from `source_dir`,
    plus quantization_config), the tokenizer and other small files of `source_dir`, model.safetensors.
    Each file is written atomically."""
    settings: dict[str, Any] = {"quant_method": "terse", "format": FORMAT, "bits": 4,
                                "group_size": _group_size(model)}
    if quantization is not None:
        settings.update(scheme=quantization.scheme, awq=quantization.awq, lm_head=quantization.lm_head,
                        embeddings=quantization.embeddings)
    return _write_checkpoint(quantized_state_dict(model), source_dir, out_dir, settings)


def save_dequantized(model: LlamaForCausalLM, source_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a dense checkpoint of the dequantized model (what transformers loads to reproduce it)."""
    return _write_checkpoint(dequantized_state_dict(model, dtype), source_dir, out_dir, None)


def _group_size(model: LlamaForCausalLM) -> int:
    sizes = {m.group_size for m in model.modules() if isinstance(m, Int4Linear | Int4Embedding)}
    if len(sizes) != 1:
        raise ValueError(f"the model holds INT4 layers of group sizes {sorted(sizes)}; expected exactly one")
    return sizes.pop()


def _write_checkpoint(state: dict[str, torch.Tensor], source_dir: Path, out_dir: Path, settings: dict[str, Any] | None) -> Path:
    from safetensors.torch import save_file

    config = json.loads((source_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if any(name.startswith("lm_head.") for name in state):
        config["tie_word_embeddings"] = False  # the head was saved on its own (not the embeddings' twin)
    if settings is not None:
        config["quantization_config"] = settings
    else:
        config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in source_dir.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name not in _SKIPPED_FILES:
            _atomic(out_dir / file.name, lambda tmp, src=file: shutil.copyfile(src, tmp))
    _atomic(out_dir / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    _atomic(out_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return out_dir


def _atomic(path: Path, write: Any) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
