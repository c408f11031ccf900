"""Pattern search on a real (tiny, random) transformers model through the q/k capture."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from terse.kernels.patterns import ModelPatterns, load_patterns, save_patterns
from terse.pipelines.pattern_search.capture import capture_layer_qk, search_transformers_model
from terse.pipelines.pattern_search.search import SearchConfig


def test_capture_matches_the_model_and_leaves_it_unchanged(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    config = model.config
    ids = torch.randint(5, config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layer_qk, scale = capture_layer_qk(model, ids)
    head_dim = config.hidden_size // config.num_attention_heads
    assert len(layer_qk) == config.num_hidden_layers
    assert layer_qk[0][0].shape == (40, config.num_attention_heads, head_dim)
    assert layer_qk[0][1].shape == (40, config.num_key_value_heads, head_dim)
    assert abs(scale - head_dim**-0.5) < 1e-6
    assert model.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before)


def test_search_on_a_tiny_model(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
    ids = torch.randint(5, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(1))
    config = SearchConfig(target_mass=0.9, num_sample_rows=32, block_size_q=16, block_size_k=16)
    patterns, scores = search_transformers_model(model, ids, "tiny-llama", config)
    assert isinstance(patterns, ModelPatterns)
    assert (patterns.num_layers, patterns.num_q_heads) == (2, model.config.num_attention_heads)
    assert all(s.recall >= 0.9 for layer in scores for s in layer)  # chosen patterns meet the target
    save_patterns(patterns, tmp_path / "p.json")
    assert load_patterns(tmp_path / "p.json") == patterns
