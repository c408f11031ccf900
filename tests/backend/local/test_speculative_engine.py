"""Speculative decoding inside the engine's other features: cancellation, prefix-cache reuse, preemption,
the streaming KV cache past its window, mixed batches (greedy, seeded sampling, logprobs, structured
output), and the ways to turn it on (load_backend, EngineConfig options, doc-QA configs, terse serve)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from terse.backend.constraints import JsonSchemaConstraint, RegexConstraint
from terse.backend.local.engine import LocalEngine
from terse.backend.registry import load_backend
from terse.backend.types import SamplingParams, StreamingKV
from terse.errors import ConfigError
from terse.pipelines.cli import main
from terse.pipelines.docqa.config import DocQAConfig
from tests.backend.local.spec_helpers import BS, REPEATING, SPEC, assert_no_leak, engine


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


def test_cancelling_a_speculating_request_frees_it_and_spares_its_neighbour(llama: Path) -> None:
    long = SamplingParams(max_tokens=300, ignore_eos=True)
    with engine(llama) as plain:
        neighbour_ref = plain.generate([REPEATING[2]], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    with engine(llama, SPEC) as eng:
        victim = eng.submit(REPEATING[0], long)
        neighbour = eng.submit(REPEATING[2], SamplingParams(max_tokens=40, ignore_eos=True))
        for i, _ in enumerate(victim):
            if i == 3:
                victim.cancel()
        out = victim.result(timeout=60)
        assert out.finish_reason == "abort" and len(out.token_ids) < 300
        assert neighbour.result(timeout=60).token_ids == neighbour_ref.token_ids
        assert eng.stats["num_running"] == 0
        assert_no_leak(eng)


def test_prefix_cache_reuses_what_a_speculating_request_computed(llama: Path) -> None:
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    outputs = []
    for speculative in (None, SPEC):
        with engine(llama, speculative) as eng:
            assert eng.tokenizer is not None
            prompt = list(eng.tokenizer(REPEATING[1]).input_ids)
            first = eng.generate([prompt], params)[0]
            follow_up = prompt + list(first.token_ids) + [7, 8, 9]
            second = eng.generate([follow_up], params)[0]
            # every full block the first request computed (all but its last token) is reused
            assert second.usage.cached_prompt_tokens == (len(prompt) + 40 - 1) // BS * BS
            outputs.append((first.token_ids, second.token_ids))
            if speculative is not None:
                assert first.usage.num_accepted_tokens > 0
            assert_no_leak(eng)
    assert outputs[0] == outputs[1]


def test_preempted_speculating_requests_recompute_to_the_same_output(llama: Path) -> None:
    prompts = REPEATING + REPEATING[:3]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    with engine(llama) as plain:
        expected = [c.token_ids for c in plain.generate(prompts, params)]
    with engine(llama, SPEC, num_kv_blocks=70, max_model_len=200) as eng:
        outputs = eng.generate(prompts, params)
        assert [c.token_ids for c in outputs] == expected
        assert eng.stats["num_preemptions"] > 0 and eng.stats["num_accepted_tokens"] > 0
        assert_no_leak(eng)


def test_streaming_kv_past_its_window_decodes_as_without_speculation(llama: Path) -> None:
    # Prompts within sinks + window: the prefill is exact however it is chunked; the decode then runs
    # far past the window, where drafts stay within one release interval (KVPolicy.max_span).
    streaming = StreamingKV(sink_tokens=4, window_tokens=24)
    prompts = ["the quick brown fox", "Alice works at Acme Corp", "numbers 3.14 42", "def f(x): return", "A paged KV"]
    params = [SamplingParams(max_tokens=90, ignore_eos=True, streaming_kv=streaming if i % 3 else None) for i in range(5)]
    results = []
    for speculative in (None, SPEC):
        with engine(llama, speculative) as eng:
            handles = [eng.submit(p, sp) for p, sp in zip(prompts, params)]
            results.append([h.result(timeout=60) for h in handles])
            assert_no_leak(eng)
    plain, spec = results
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    assert sum(c.usage.num_accepted_tokens for c, p in zip(spec, params) if p.streaming_kv is not None) > 0


def test_a_mixed_batch_keeps_every_kind_of_request_exact(llama: Path) -> None:
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}
    requests = [
        (REPEATING[0], SamplingParams(max_tokens=40, ignore_eos=True)),
        (REPEATING[1], SamplingParams(max_tokens=40, ignore_eos=True, logprobs=2)),
        (REPEATING[2], SamplingParams(max_tokens=40, temperature=0.8, seed=11)),
        (REPEATING[3], SamplingParams(max_tokens=30, constraint=JsonSchemaConstraint.of(schema))),
        (REPEATING[4], SamplingParams(max_tokens=20, constraint=RegexConstraint(r"[a-z ]{5,15}"))),
        (REPEATING[0], SamplingParams(max_tokens=25, stop=("fox",))),
    ]
    runs = []
    for speculative in (None, SPEC, SPEC):
        with engine(llama, speculative) as eng:
            handles = [eng.submit(p, sp) for p, sp in requests]
            runs.append([h.result(timeout=60) for h in handles])
            assert_no_leak(eng)
    plain, spec, again = runs
    for i in (0, 1, 3, 4, 5):  # greedy, with or without logprobs, constrained, stopped
        assert spec[i].token_ids == plain[i].token_ids and spec[i].text == plain[i].text
    assert spec[2].token_ids == again[2].token_ids  # seeded sampling repeats
    assert json.loads(spec[3].text)["city"] in ("Paris", "Oslo")
    assert spec[3].usage.num_draft_tokens == spec[4].usage.num_draft_tokens == 0  # constrained: never drafts
    assert spec[0].usage.num_accepted_tokens > 0
    assert spec[1].logprobs is not None and len(spec[1].logprobs) == 40


def test_every_way_of_turning_it_on(llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    backend = load_backend(f"local:{llama}", speculative="prompt_lookup", num_kv_blocks=64)
    assert isinstance(backend, LocalEngine) and backend.speculator is not None
    backend.close()
    config = DocQAConfig.from_dict({
        "backend": f"local:{llama}", "backend_options": {"speculative": {"method": "prompt_lookup", "num_draft_tokens": 6}},
    })
    assert config.backend_options["speculative"]["num_draft_tokens"] == 6
    with pytest.raises(ConfigError, match="speculative.num_draft_tokens=0"):
        DocQAConfig.from_dict({"backend": f"local:{llama}", "backend_options": {"speculative": {"num_draft_tokens": 0}}})
    errors = [
        (["--speculative", "medusa"], "--speculative 'medusa' must be one of 'prompt_lookup'"),
        (["--speculative-tokens", "3"], "--speculative-ngram / --speculative-max-batch need --speculative prompt_lookup"),
        (["--speculative", "prompt_lookup", "--speculative-ngram", "3"], "--speculative-ngram '3' must be MIN:MAX"),
        (["--speculative", "prompt_lookup", "--speculative-tokens", "0"], "--speculative-tokens 0 must be an int >= 1"),
        (["--speculative", "prompt_lookup", "--speculative-ngram", "4:2"], "--speculative-ngram 4 exceeds max_ngram=2"),
        (["--speculative", "prompt_lookup", "--speculative-max-batch", "lots"],
         "--speculative-max-batch 'lots' must be a number of sequences (e.g. 32) or 'none'"),
        (["--speculative", "prompt_lookup", "--speculative-max-batch", "0"], "--speculative-max-batch 0 must be"),
        (["--speculative-max-batch", "8"], "need --speculative prompt_lookup"),
    ]
    for flags, expected in errors:
        assert main(["serve", "--model", str(llama), *flags, "--verbose"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("terse serve: error: ") and expected in err, err
    assert main(["serve", "--upstream", "http://127.0.0.1:9/v1", "--speculative", "prompt_lookup"]) == 2
    assert "--speculative configure the local engine" in capsys.readouterr().err


def _generate_together(eng: LocalEngine, prompts: list[str], params: SamplingParams) -> list[Any]:
    """`generate`, with every prompt queued before the engine's loop takes any: all are prefilled in one
    step and decode side by side to the end (a loop that woke at the first submit would start it alone)."""
    queued = threading.Event()
    drain = eng._drain_inbox

    def held() -> None:
        queued.wait()
        drain()

    eng._drain_inbox = held  # type: ignore[method-assign]
    try:
        handles = [eng.submit(p, params) for p in prompts]
    finally:
        queued.set()
    eng._drain_inbox = drain  # type: ignore[method-assign]
    return [h.result() for h in handles]


def test_nothing_drafts_while_more_sequences_decode_than_max_batch_size(llama: Path) -> None:
    """Above `max_batch_size` decoding sequences no one drafts or waits for a draft (output unchanged);
    at or below it the same requests draft."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = REPEATING[:4]
    whole = {"max_num_batched_tokens": 1024}  # every prompt prefilled in one step: all four decode together
    with engine(llama, **whole) as plain:
        reference = [c.token_ids for c in plain.generate(prompts, params)]
    for cap, drafts in ((3, False), (4, True), (None, True)):
        with engine(llama, SPEC | {"max_batch_size": cap}, **whole) as eng:
            out = _generate_together(eng, prompts, params)
            assert [c.token_ids for c in out] == reference
            assert eng.speculator is not None
            assert (eng.speculator.num_verify_steps > 0) == drafts, cap
            assert (eng.speculator.num_capped_steps > 0) == (not drafts), cap
            assert_no_leak(eng)
