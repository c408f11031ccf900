"""Engine behaviour: bad input, cancellation, preemption under memory pressure, prefix cache on/off,
concurrency. Reference outputs come from transformers on the same weights."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from terse.backend.local.engine import LocalEngine
from terse.backend.registry import load_backend
from terse.backend.types import SamplingParams
from terse.errors import ConfigError, InvalidRequestError, ModelLoadError
from tests.backend.local.helpers import Reference, mixed_prompts

SHARED_DOC = (
    "A paged KV cache stores keys and values in fixed-size blocks shared between requests. "
    "Alice works at Acme Corp in Paris; Bob founded Globex in 1998. The quick brown fox jumps over the lazy dog. "
)


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def engine(llama: Path) -> Iterator[LocalEngine]:
    eng = LocalEngine.from_spec(str(llama), kv_block_size=4, max_num_batched_tokens=32, max_model_len=128)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def ref(llama: Path) -> Reference:
    return Reference(llama)


def assert_no_leak(eng: LocalEngine) -> None:
    """Every block is either free or held once by the prefix cache; nothing else holds any."""
    cached = eng.prefix_cache.num_cached_blocks if eng.prefix_cache is not None else 0
    assert eng.allocator.num_free_blocks + cached == eng.num_kv_blocks
    held = [b for b in range(eng.num_kv_blocks) if eng.allocator.ref_count(b) > 0]
    assert all(eng.allocator.ref_count(b) == 1 for b in held)


def test_bad_requests_raise_typed_errors_and_engine_keeps_serving(engine: LocalEngine) -> None:
    ok = engine.submit("The quick brown fox", SamplingParams(max_tokens=40, ignore_eos=True))
    with pytest.raises(InvalidRequestError, match=r"prompt has \d+ tokens but max_model_len=128.*shorten"):
        engine.submit("fox " * 300, SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError, match=r"max_tokens=200 .* exceeds max_model_len=128; use max_tokens <= "):
        engine.submit("The quick brown fox", SamplingParams(max_tokens=200))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.submit("", SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(InvalidRequestError, match=r"outside the vocabulary"):
        engine.submit([1, 10**6], SamplingParams())
    with pytest.raises(InvalidRequestError, match=r"max_tokens=-1"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(InvalidRequestError, match=r"top_p=1.5 must be in \(0, 1\]"):
        SamplingParams(top_p=1.5)
    with pytest.raises(InvalidRequestError, match=r"top_p=0"):
        SamplingParams(top_p=0)
    out = ok.result(timeout=60)
    assert out.finish_reason == "length" and out.usage.completion_tokens == 40


def test_unknown_path_and_unsupported_architecture(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        LocalEngine.from_spec(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="could not find model 'no-such-org/no-such-model'.*local directory"):
        LocalEngine.from_spec("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match=r"'GPT2LMHeadModel' is not supported.*LlamaForCausalLM.*'hf:"):
        LocalEngine.from_spec(str(tiny_model_factory("gpt2")))
    with pytest.raises(ConfigError, match="unknown EngineConfig fields"):
        LocalEngine.from_spec(str(tiny_model_factory("llama")), kv_blocks=3)
    with pytest.raises(ConfigError, match="kv_cache_memory=1.5"):
        LocalEngine.from_spec(str(tiny_model_factory("llama")), kv_cache_memory=1.5)


def test_request_too_large_for_the_pool_fails_alone(llama: Path) -> None:
    with LocalEngine.from_spec(str(llama), kv_block_size=4, num_kv_blocks=8, max_model_len=128) as eng:
        with pytest.raises(InvalidRequestError, match=r"may need \d+ KV blocks .* pool holds 8"):
            eng.submit("The quick brown fox", SamplingParams(max_tokens=60))
        assert eng.generate(["Hi"], SamplingParams(max_tokens=4))[0].usage.completion_tokens == 4


def test_cancel_frees_blocks(llama: Path) -> None:
    with LocalEngine.from_spec(str(llama), kv_block_size=4, max_model_len=256, enable_prefix_cache=False) as eng:
        free_at_start = eng.allocator.num_free_blocks
        handle = eng.submit("The quick brown fox", SamplingParams(max_tokens=200, ignore_eos=True))
        other = eng.submit("Alice works", SamplingParams(max_tokens=8, ignore_eos=True))
        next(iter(handle))  # wait for the first text
        handle.cancel()
        out = handle.result(timeout=60)
        assert out.finish_reason == "abort" and out.usage.completion_tokens < 200
        assert other.result(timeout=60).usage.completion_tokens == 8
        assert eng.allocator.num_free_blocks == free_at_start


def test_preemption_under_memory_pressure_matches_reference(llama: Path, ref: Reference) -> None:
    prompts = mixed_prompts(8, seed=3, max_words=12)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    # 30 blocks of 4 tokens cannot hold 8 sequences of ~40 tokens at once: some are preempted.
    with LocalEngine.from_spec(
        str(llama), kv_block_size=4, num_kv_blocks=30, max_model_len=128, enable_prefix_cache=False
    ) as eng:
        outs = eng.generate(prompts, params)
        assert eng.scheduler.num_preemptions > 0
        assert eng.allocator.num_free_blocks == 30
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == ref.greedy(prompt, 24, [])


def test_prefix_cache_same_outputs_and_reports_cached_tokens(llama: Path) -> None:
    prompts = [SHARED_DOC + q for q in ("Where does Alice work?", "Who founded Globex?", "What jumps?", "Why?")]
    params = SamplingParams(max_tokens=10)
    with LocalEngine.from_spec(str(llama), kv_block_size=4, max_num_batched_tokens=32) as eng:
        on = eng.generate(prompts, params)
        again = eng.generate(prompts[:1], params)[0]
        shared_blocks = (len(eng.encode(SHARED_DOC)) + 1) // 4  # + 1: BOS
        assert_no_leak(eng)
    with LocalEngine.from_spec(
        str(llama), kv_block_size=4, max_num_batched_tokens=32, enable_prefix_cache=False
    ) as eng:
        off = eng.generate(prompts, params)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    assert all(o.usage.cached_prompt_tokens == 0 for o in off)
    # Siblings wait for the first request's shared prefill, then reuse it (whole blocks only).
    assert on[0].usage.cached_prompt_tokens == 0
    assert all(o.usage.cached_prompt_tokens >= (shared_blocks - 1) * 4 for o in on[1:])
    # A repeated prompt reuses every whole block but must compute its last token.
    assert again.usage.cached_prompt_tokens == (again.usage.prompt_tokens - 1) // 4 * 4


def test_prefix_cache_with_eviction_and_preemption(llama: Path, ref: Reference) -> None:
    prompts = [SHARED_DOC[: 40 + 13 * i] + " end" for i in range(6)] + mixed_prompts(6, seed=4, max_words=10)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    with LocalEngine.from_spec(
        str(llama), kv_block_size=4, num_kv_blocks=40, max_num_batched_tokens=24, max_model_len=128
    ) as eng:
        outs = eng.generate(prompts, params)
        outs2 = eng.generate(prompts[::-1], params)[::-1]
        assert eng.scheduler.num_preemptions > 0
        assert eng.stats["num_cached_tokens"] > 0
        assert eng.prefix_cache is not None and eng.prefix_cache.num_evicted_blocks > 0
        assert_no_leak(eng)
    for prompt, out, out2 in zip(prompts, outs, outs2):
        expected = ref.greedy(prompt, 16, [])
        assert list(out.token_ids) == expected and list(out2.token_ids) == expected


def test_many_threads_overlapping_prefixes(llama: Path, ref: Reference) -> None:
    stems = [SHARED_DOC[:60], SHARED_DOC[:90], SHARED_DOC[30:110]]
    prompts = [stems[i % 3] + f" question {i}" for i in range(24)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    results: dict[int, list[int]] = {}
    with LocalEngine.from_spec(
        str(llama), kv_block_size=4, num_kv_blocks=80, max_num_batched_tokens=32, max_model_len=128
    ) as eng:

        def worker(offset: int) -> None:
            handles = [(i, eng.submit(prompts[i], params)) for i in range(offset, len(prompts), 6)]
            for i, h in handles:
                results[i] = list(h.result(timeout=120).token_ids)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert_no_leak(eng)
        assert eng.stats["num_cached_tokens"] > 0
    for i, prompt in enumerate(prompts):
        assert results[i] == ref.greedy(prompt, 8, []), i


def test_chat_tokens_and_load_backend(llama: Path) -> None:
    backend = load_backend(f"local:{llama}", kv_block_size=4, max_model_len=64)
    try:
        text = backend.render_chat([{"role": "user", "content": "Hi"}])
        assert text == "<|user|>\nHi<|end|>\n<|assistant|>\n"
        ids = backend.encode("Hello world")
        assert backend.count_tokens("Hello world") == len(ids) and backend.decode(ids) == "Hello world"
        assert backend.max_model_len == 64 and backend.model_name == str(llama)
    finally:
        backend.close()
