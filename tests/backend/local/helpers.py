"""Shared helpers of the local engine tests: reference outputs from transformers on the same weights."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Alice", "works", "at", "Acme", "Corp", "in", "Paris", "Bob", "founded", "Globex", "question", "answer", "paged", "cache", "blocks", "shared", "between", "requests", "numbers", "3.14", "42", "code", "def", "return"]


def mixed_prompts(num_prompts: int, seed: int = 0, max_words: int = 40) -> list[str]:
    """Prompts of mixed lengths (1 to `max_words` words) from a fixed seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(num_prompts)]


class Reference:
    """transformers' model and tokenizer for a tiny model directory (float32, CPU)."""

    def __init__(self, path: Path) -> None:
        self.model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model.generation_config.eos_token_id = None  # stop only where a test asks

    def greedy(self, prompt: str | list[int], max_new_tokens: int, eos_token_ids: list[int]) -> list[int]:
        """Greedy continuation; stops at `eos_token_ids` (none: runs `max_new_tokens`)."""
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else prompt
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=eos_token_ids or None, pad_token_id=0,
            )
        generated: list[int] = out[0, len(ids):].tolist()
        return generated

    def logprobs(self, ids: list[int]) -> list[float]:
        """log P(ids[i + 1] | ids[:i + 1]) for every i."""
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)
        return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
