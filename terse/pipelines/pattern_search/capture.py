"""Run the per-head pattern search on a transformers model: capture each layer's post-rotary q/k.

    model = AutoModelForCausalLM.from_pretrained(path)
    patterns, scores = search_transformers_model(model, sample_ids, model_name=path)
    save_patterns(patterns, Path(path) / "sparse_patterns.json")

The capture goes through transformers' attention-function registry: for one forward pass the model's
attention implementation is swapped for a function that records (query, key) exactly as the model's
attention receives them (after rotary embedding, before GQA expansion) and then runs SDPA, so the
forward's output is unchanged. The previous implementation is restored afterwards, also on errors.
"""

from __future__ import annotations

from typing import Any

import torch

from terse.errors import ConfigError
from terse.kernels.patterns import ModelPatterns
from terse.pipelines.pattern_search.search import HeadScore, SearchConfig, search_model_patterns

CAPTURE_IMPLEMENTATION = "terse_capture_qk"


def capture_layer_qk(model: Any, input_ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """One forward of `model` over input_ids [1, L] -> ([(q [L, Hq, D], k [L, Hkv, D]) per layer], scale)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError(f"input_ids has shape {tuple(input_ids.shape)}; pass one sample prompt as [1, L]")
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    scales: list[float] = []

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        # query [1, Hq, L, D], key [1, Hkv, L, D] -> stored as [L, H, D]
        captured.append((query[0].transpose(0, 1).detach().clone(), key[0].transpose(0, 1).detach().clone()))
        scales.append(float(kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    if not captured:
        raise ConfigError(
            f"{type(model).__name__} ran no attention through transformers' attention registry; the search "
            "needs a model whose attention does (Llama, Mistral, Qwen2/3 do)"
        )
    return captured, scales[0]


def search_transformers_model(
    model: Any, input_ids: torch.Tensor, model_name: str, config: SearchConfig | None = None
) -> tuple[ModelPatterns, list[list[HeadScore]]]:
    """Capture q/k of one sample prompt (input_ids [1, L]) and search every layer's head patterns."""
    layer_qk, scale = capture_layer_qk(model, input_ids)
    return search_model_patterns(model_name, layer_qk, scale, config)
