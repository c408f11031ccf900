"""Correctness anchor: greedy outputs equal transformers' `generate` token for token, and `score()` and
generated tokens' logprobs equal transformers' log-probabilities, on the same random weights (float32, CPU)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from terse.backend.local.engine import LocalEngine
from terse.backend.types import Completion, SamplingParams
from tests.backend.local.helpers import Reference, mixed_prompts

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
MAX_NEW = 12


@pytest.fixture(scope="module", params=ARCHS)
def pair(request: pytest.FixtureRequest, tiny_model_factory: Callable[..., Path]) -> Iterator[tuple[LocalEngine, Reference]]:
    path = tiny_model_factory(request.param)
    # Small blocks and a small step budget: long prompts are chunked and span many blocks.
    engine = LocalEngine.from_spec(str(path), kv_block_size=4, max_num_batched_tokens=24, num_kv_blocks=512)
    yield engine, Reference(path)
    engine.close()


def test_single_prompt_matches_transformers(pair: tuple[LocalEngine, Reference]) -> None:
    engine, ref = pair
    prompt = "Alice works at Acme Corp in Paris; Bob founded Globex in 1998. Question: where"
    (out,) = engine.generate([prompt], SamplingParams(max_tokens=MAX_NEW))
    expected = ref.greedy(prompt, MAX_NEW, sorted(engine.eos_token_ids))
    assert list(out.token_ids) == expected
    assert out.usage.prompt_tokens == len(ref.tokenizer(prompt).input_ids)
    assert out.usage.completion_tokens == len(expected)
    # A trailing incomplete character is held back by the detokenizer, never emitted.
    assert out.text == ref.tokenizer.decode(expected, skip_special_tokens=True).rstrip("\ufffd")
    assert out.metrics["ttft"] <= out.metrics["latency"]


def test_32_prompts_from_threads_match_transformers(pair: tuple[LocalEngine, Reference]) -> None:
    engine, ref = pair
    prompts = mixed_prompts(32, seed=1)
    params = SamplingParams(max_tokens=MAX_NEW)
    steps_before = engine.num_steps
    with ThreadPoolExecutor(max_workers=4) as pool:
        handles = list(pool.map(lambda p: engine.submit(p, params), prompts))
    outs: list[Completion] = [h.result(timeout=120) for h in handles]
    eos = sorted(engine.eos_token_ids)
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == ref.greedy(prompt, MAX_NEW, eos), prompt
    # The 24-token budget forces chunked prefill and many steps for these prompts.
    assert engine.num_steps - steps_before > MAX_NEW
    assert max(o.usage.prompt_tokens for o in outs) > 24


def test_streamed_deltas_concatenate_to_text(pair: tuple[LocalEngine, Reference]) -> None:
    engine, _ = pair
    handle = engine.submit("The quick brown fox", SamplingParams(max_tokens=MAX_NEW))
    deltas = list(handle)
    assert "".join(deltas) == handle.result().text


def test_score_matches_transformers(pair: tuple[LocalEngine, Reference]) -> None:
    engine, ref = pair
    texts = mixed_prompts(6, seed=2)
    prefix = "Question: where does Alice work?"
    scores = engine.score(texts, prefix=prefix)
    prefix_ids = ref.tokenizer(prefix).input_ids  # BOS + prefix
    for text, got in zip(texts, scores):
        text_ids = ref.tokenizer(text, add_special_tokens=False).input_ids
        assert list(got.token_ids) == text_ids
        expected = ref.logprobs(prefix_ids + text_ids)[len(prefix_ids) - 1 :]
        assert got.logprobs == pytest.approx(expected, abs=1e-4)
        assert all(0 <= a <= b <= len(text) for a, b in got.offsets)


def test_score_without_prefix_conditions_on_bos(pair: tuple[LocalEngine, Reference]) -> None:
    engine, ref = pair
    (got,) = engine.score(["the lazy dog"])
    ids = ref.tokenizer("the lazy dog").input_ids  # BOS first
    assert got.logprobs == pytest.approx(ref.logprobs(ids), abs=1e-4)


def test_generated_logprobs_match_transformers_in_a_mixed_batch(pair: tuple[LocalEngine, Reference]) -> None:
    """Rows asking for logprobs (greedy and sampled, different top-k) beside rows that do not: each entry
    is transformers' log-softmax at that position (before temperature), computed on the device and
    carried back with the sampled ids."""
    engine, ref = pair
    prompts = mixed_prompts(4, seed=3)
    params = [
        SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=MAX_NEW, ignore_eos=True),
        SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, logprobs=0, temperature=1.0, seed=5),
        SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, logprobs=5, temperature=0.7, seed=6),
    ]
    outs = [h.result(timeout=120) for h in [engine.submit(p, sp) for p, sp in zip(prompts, params)]]
    assert outs[1].logprobs is None
    for prompt, sp, out in zip(prompts, params, outs):
        if sp.logprobs is None:
            continue
        assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == MAX_NEW
        ids = ref.tokenizer(prompt).input_ids + list(out.token_ids)
        with torch.no_grad():
            logits = ref.model(torch.tensor([ids])).logits[0].float()  # [L, V]
        expected = torch.log_softmax(logits, dim=-1)[len(ids) - MAX_NEW - 1 : -1]  # [MAX_NEW, V]
        for entry, token_id, row in zip(out.logprobs, out.token_ids, expected):
            assert entry.token_id == token_id
            assert entry.logprob == pytest.approx(row[token_id].item(), abs=1e-4)
            values, top_ids = row.topk(sp.logprobs)
            assert [t for t, _ in entry.top] == top_ids.tolist()
            assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
