"""Speculative decoding is exact: greedy output token-identical with and without it (tiny random models,
both attention paths of the verify rows, the reference model on doc-QA prompts), the KV cache after
rollback equal to a one-token-per-step run, stops and length limits inside accepted drafts, streamed
deltas and log-probabilities, and sampling keeping the output distribution (seeded, chi-square against
the exact distribution of a vocabulary-8 model)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from terse.backend.local.config import EngineConfig
from terse.backend.local.engine import LocalEngine
from terse.backend.local.models.llama import ModelConfig
from terse.backend.local.speculative import SpeculativeSettings
from terse.backend.types import SamplingParams
from terse.models import reference_model_path
from terse.organize.formats import qa_messages
from terse.synth.dataset import SplitConfig, build_split
from terse.synth.tokenizer import render_chat
from tests.backend.local.spec_helpers import BS, REPEATING, SPEC, assert_no_leak, engine

GREEDY = SamplingParams(max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def plain_outputs(llama: Path) -> list[tuple[int, ...]]:
    eng = engine(llama)
    try:
        return [c.token_ids for c in eng.generate(REPEATING, GREEDY)]
    finally:
        eng.close()


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-rows", "decode-kernel-rows"])
def test_greedy_output_equals_one_token_decoding(llama: Path, plain_outputs: list[tuple[int, ...]], grouped: bool) -> None:
    eng = engine(llama, SPEC)
    eng.runner.attention.group_decode_rows = grouped  # False: every row a decode query of its own (the CUDA-graph layout)
    try:
        batched = eng.generate(REPEATING, GREEDY)
        steps_before = eng.stats["num_steps"]
        alone = [eng.generate([p], GREEDY)[0] for p in REPEATING[:2]]
        stats = eng.stats
        assert [c.token_ids for c in batched] == plain_outputs
        assert [c.token_ids for c in alone] == plain_outputs[:2]
        assert stats["num_accepted_tokens"] > 0 and stats["num_draft_tokens"] > stats["num_accepted_tokens"]
        usage = [c.usage for c in batched]
        assert sum(u.num_accepted_tokens for u in usage) > 0
        assert all(u.num_accepted_tokens <= u.num_draft_tokens for u in usage)
        assert stats["num_steps"] - steps_before < 2 * 48  # the lone requests took fewer steps than tokens
        assert_no_leak(eng)
    finally:
        eng.close()


def test_held_drafting_is_exact_and_voids_no_draft(llama: Path, plain_outputs: list[tuple[int, ...]]) -> None:
    eng = engine(llama, {**SPEC, "draft_ahead": False})  # the default: drafting sequences wait for their token
    try:
        alone = [eng.generate([p], GREEDY)[0] for p in REPEATING[:2]]
        batched = eng.generate(REPEATING, GREEDY)
        assert [c.token_ids for c in batched] == plain_outputs and [c.token_ids for c in alone] == plain_outputs[:2]
        stats = eng.stats
        assert stats["num_accepted_tokens"] > 0 and stats["num_voided_drafts"] == 0
    finally:
        eng.close()


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_greedy_output_equals_one_token_decoding_on_other_architectures(tiny_model_factory: Callable[..., Path], arch: str) -> None:
    path = tiny_model_factory(arch)
    outputs = []
    for speculative in (None, SPEC):
        eng = engine(path, speculative)
        outputs.append([c.token_ids for c in eng.generate(REPEATING[:3], GREEDY)])
        eng.close()
    assert outputs[0] == outputs[1]


def test_reference_model_on_doc_qa_prompts_accepts_drafts_and_answers_the_same() -> None:
    data = build_split("test", SplitConfig(num_worlds=1, questions_per_kind=2, needle_lengths=(), context_tokens=500))
    questions = [q for q in data.questions if q.kind in ("list", "single")][:3]
    prompts = [
        render_chat(list(qa_messages(q.question, [(d, data.document(d).text) for d in q.context_doc_ids])))  # type: ignore[arg-type]
        for q in questions
    ]
    params = SamplingParams(max_tokens=40)
    answers = []
    for speculative in (None, SpeculativeSettings()):
        eng = LocalEngine.from_spec(str(reference_model_path()), num_kv_blocks=512, speculative=speculative)
        answers.append(eng.generate(prompts, params))
        eng.close()
    assert [c.token_ids for c in answers[0]] == [c.token_ids for c in answers[1]]
    assert sum(c.usage.num_accepted_tokens for c in answers[1]) > 0


def test_rollback_leaves_the_kv_cache_equal_to_one_token_decoding(llama: Path) -> None:
    params = SamplingParams(max_tokens=45, ignore_eos=True)
    caches = []
    for speculative in (None, SPEC):
        eng = engine(llama, speculative)
        assert eng.tokenizer is not None
        prompt = list(eng.tokenizer(REPEATING[0]).input_ids)
        out = eng.generate([prompt], params)[0]
        if speculative is not None:
            assert out.usage.num_draft_tokens > out.usage.num_accepted_tokens > 0  # something was rolled back
        assert eng.prefix_cache is not None
        hit = eng.prefix_cache.lookup(prompt + list(out.token_ids))
        caches.append((out.token_ids, len(hit.block_ids), eng.pool.kv[:, :, hit.block_ids].clone()))
        assert_no_leak(eng)
        eng.close()
    (plain_ids, plain_blocks, plain_kv), (spec_ids, spec_blocks, spec_kv) = caches
    assert spec_ids == plain_ids and spec_blocks == plain_blocks >= 40 // BS
    torch.testing.assert_close(spec_kv, plain_kv, atol=1e-5, rtol=1e-4)


def test_max_tokens_and_stop_strings_landing_inside_accepted_drafts(llama: Path) -> None:
    plain, spec = engine(llama), engine(llama, SPEC)
    try:
        prompt = REPEATING[0]
        for max_tokens in (1, 2, 3, 5, 8, 13):
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            a, b = plain.generate([prompt], params)[0], spec.generate([prompt], params)[0]
            assert b.token_ids == a.token_ids and b.usage.completion_tokens == max_tokens == len(b.token_ids)
        full = plain.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True))[0].text
        for stop in (full[9:13], full[20:24], full[-6:-2]):
            params = SamplingParams(max_tokens=40, stop=(stop,), ignore_eos=True)
            a, b = plain.generate([prompt], params)[0], spec.generate([prompt], params)[0]
            assert (b.text, b.finish_reason, b.token_ids) == (a.text, a.finish_reason, a.token_ids)
            assert a.finish_reason == "stop" and stop not in b.text
        assert spec.stats["num_accepted_tokens"] > 0
        assert_no_leak(spec)
    finally:
        plain.close()
        spec.close()


def test_streamed_deltas_and_logprobs_match_one_token_decoding(llama: Path) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True, logprobs=3)
    results = []
    for speculative in (None, SPEC):
        eng = engine(llama, speculative)
        handle = eng.submit(REPEATING[1], params)
        deltas = list(handle)
        completion = handle.result(timeout=60)
        assert "".join(deltas) == completion.text and len(deltas) > 5
        results.append(completion)
        eng.close()
    plain, spec = results
    assert spec.token_ids == plain.token_ids and spec.usage.num_accepted_tokens > 0
    assert plain.logprobs is not None and spec.logprobs is not None
    for a, b in zip(plain.logprobs, spec.logprobs):
        assert b.token_id == a.token_id and b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert [t for t, _ in b.top] == [t for t, _ in a.top]


def _vocab8_engine(speculative: SpeculativeSettings | None) -> LocalEngine:
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=256, attention_bias=False, qk_norm=False, mlp_bias=False, tie_word_embeddings=False,
        sliding_window=None, bos_token_id=None, eos_token_ids=(),
    )
    eng = LocalEngine.from_random(config, EngineConfig(device="cpu", kv_block_size=BS, num_kv_blocks=2048, max_model_len=64,
                                                       speculative=speculative))
    with torch.no_grad():
        eng.runner.model.lm_head.weight.mul_(30)  # random weights give near-uniform logits; sharpen them
    return eng


def _exact_joint(eng: LocalEngine, prompt: list[int]) -> torch.Tensor:
    """P(o0, o1, o2, o3 | prompt) [8, 8, 8, 8] from transformers on the engine's weights (float64 softmax)."""
    hf = HFLlama(LlamaConfig(
        vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )).eval()
    hf.load_state_dict(eng.runner.model.checkpoint_state_dict())
    grid = torch.cartesian_prod(*[torch.arange(8)] * 3)  # [512, 3] every (o0, o1, o2)
    ids = torch.cat((torch.tensor(prompt).repeat(len(grid), 1), grid), dim=1)
    with torch.no_grad():
        probs = torch.softmax(hf(ids).logits[:, -4:].double(), dim=-1).view(8, 8, 8, 4, 8)  # next-token at o0..o3
    p0 = probs[0, 0, 0, 0][:, None, None, None]
    p1 = probs[:, 0, 0, 1][:, :, None, None]
    p2 = probs[:, :, 0, 2][:, :, :, None]
    return p0 * p1 * p2 * probs[:, :, :, 3]


def _chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    o, e = observed.flatten(), expected.flatten()
    small = e < 5  # pool the rare cells so the chi-square approximation holds
    if small.any():
        o = torch.cat((o[~small], o[small].sum()[None]))
        e = torch.cat((e[~small], e[small].sum()[None]))
    stat = ((o - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(o) - 1) / 2.0), stat / 2.0))


@pytest.mark.parametrize("prompt", [[4, 1, 0, 0, 0, 0] * 2 + [4, 1, 0, 0], [1, 5, 2, 5, 5, 5] * 2 + [1, 5, 2, 5]])
def test_sampling_keeps_the_output_distribution(prompt: list[int]) -> None:
    eng = _vocab8_engine(SpeculativeSettings(num_draft_tokens=3, min_acceptance=0.0, min_accepted_tokens=0.0,
                                              max_batch_size=None))
    num = 2000
    try:
        handles = [eng.submit(prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=i)) for i in range(num)]
        outputs = [h.result(timeout=120).token_ids for h in handles]
        stats = eng.stats
        exact = _exact_joint(eng, prompt) * num
    finally:
        eng.close()
    assert stats["num_accepted_tokens"] > 150  # drafts were verified and accepted often
    counts = torch.zeros(8, 8, 8, 8, dtype=torch.float64)
    for o in outputs:
        counts[o] += 1
    for dims in ((0, 1, 2), (0, 1, 3), (0, 2, 3), (0, 3), (0, 1)):  # o3, o2, o1, (o1, o2), (o2, o3)
        assert _chi_square_p(counts.sum(dims), exact.sum(dims)) > 1e-3, dims
