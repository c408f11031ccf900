"""Build a `LlamaForCausalLM` from a model directory or hub name, or with random weights (benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from terse.backend.local.models.llama import LlamaForCausalLM, ModelConfig
from terse.errors import ModelLoadError


def resolve_model_dir(path_or_name: str) -> Path:
    """A local directory as is; otherwise a hub name fetched (or found in the local hub cache)."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or path_or_name.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model path {path_or_name!r} is not a directory; give a directory holding config.json and "
            f"*.safetensors, or a hub name such as 'Qwen/Qwen2.5-0.5B-Instruct'"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            path_or_name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]
        )
    except Exception as e:  # the hub client raises many types (offline, 404, auth)
        raise ModelLoadError(
            f"could not find model {path_or_name!r} locally or download it from the hub ({type(e).__name__}: "
            f"{e}); give a local directory, or download it first while online (HF_HUB_OFFLINE must be unset)"
        ) from e
    return Path(local)


def read_model_config(model_dir: Path) -> ModelConfig:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{str(model_dir)!r} has no config.json; it is not a Hugging Face model directory")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{str(config_path)!r} is not valid JSON: {e}") from e
    return ModelConfig.from_hf_dict(raw)


def load_model(model_dir: Path, config: ModelConfig, *, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Read every *.safetensors file of `model_dir` into a model on `device` in `dtype`."""
    from safetensors.torch import load_file

    from terse.backend.local.quant.loading import load_prequantized_model

    quantized = load_prequantized_model(model_dir, config, device=device, dtype=dtype)  # GPTQ / AWQ / terse
    if quantized is not None:
        return quantized
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{str(model_dir)!r} holds no *.safetensors weights; convert the checkpoint with "
            f"save_pretrained(..., safe_serialization=True)"
        )
    model = LlamaForCausalLM(config, device="meta", dtype=dtype)
    expected = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file), device=str(device)).items():
            if name in expected:
                state[name] = tensor.to(dtype)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(
            f"{str(model_dir)!r} lacks {len(missing)} weights the {config.architecture} layout needs "
            f"(first: {missing[:3]}); the checkpoint is incomplete or of another architecture"
        )
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.fuse()
    return model.eval()


def random_model(config: ModelConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """Random weights built directly on `device` (no checkpoint): for speed benchmarks on a model shape."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    model = LlamaForCausalLM(config, device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.fuse()
    return model.eval()
