"""Tiny random models with a tokenizer trained here, for CPU tests without downloads.

`build_tiny_model(path, arch)` writes a directory that both transformers' `from_pretrained` and
terse's local engine load: config.json, model.safetensors, tokenizer files with a chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice works at Acme Corp in Paris; Bob founded Globex in 1998.",
    "Question: Where does Alice work? Answer: Acme Corp.",
    "Numbers like 3.14, 42 and 2026-11-21 appear in text, and code: def f(x): return x * 2",
    "Les élèves étudient à l'université. 東京は日本の首都です。 Привет, мир!",
    "A paged KV cache stores keys and values in fixed-size blocks shared between requests.",
    "Skeleton:\n1. First point\n2. Second point\n3. Third point",
]

ARCH_CONFIGS: dict[str, dict[str, object]] = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": None},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 16},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
}


def train_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small mixed-script corpus (BOS added to every encode)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    vocab_size: int = 512,
) -> Path:
    """Write a random tiny model of `arch` ("llama", "mistral", "qwen2", "qwen3", "gpt2") to `path`."""
    tokenizer = train_tokenizer(vocab_size)
    extra = dict(ARCH_CONFIGS[arch])
    model_type = str(extra.pop("model_type"))
    common: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|end|>"),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model_type == "gpt2":
        common |= {"n_embd": hidden_size, "n_layer": num_layers, "n_head": num_heads, "n_positions": max_position_embeddings}
    else:
        common |= {
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 3,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": max_position_embeddings,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        }
    config = AutoConfig.for_model(model_type, **common, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so greedy outputs vary from token to token
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
