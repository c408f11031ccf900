"""Structured output in the local engine: every output parses and validates (single, batched, streamed,
greedy and sampled), unconstrained neighbours decode exactly as without constraints, the grammar ends
the request, and the prefix cache, stop strings and cancellation keep working."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from terse.backend.constraints import (
    ChoiceConstraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
)
from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams
from terse.errors import InvalidRequestError
from tests.backend.structured_cases import SCHEMAS

PROMPTS = ["Hello there", "The quick brown fox", "Alice works at Acme", "Numbers like 3.14"]


@pytest.fixture(scope="module")
def engine(tiny_model_factory: Callable[..., Path]) -> Iterator[LocalEngine]:
    eng = LocalEngine.from_spec(str(tiny_model_factory("llama")), num_kv_blocks=192, max_model_len=512)
    yield eng
    eng.close()


def _valid(text: str, schema: dict[str, object]) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_batched_outputs_validate_against_the_schema(engine: LocalEngine, name: str) -> None:
    schema = SCHEMAS[name]
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=200, temperature=temperature, seed=3, constraint=JsonSchemaConstraint.of(schema))
        for out in engine.generate(PROMPTS, params):
            assert out.finish_reason == "stop", out.text
            _valid(out.text, schema)


def test_single_streamed_request_validates_and_deltas_join_to_the_text(engine: LocalEngine) -> None:
    schema = SCHEMAS["nested"]
    handle = engine.submit("Skeleton:", SamplingParams(max_tokens=200, constraint=JsonSchemaConstraint.of(schema)))
    deltas = list(handle)
    result = handle.result()
    assert len(deltas) > 3 and "".join(deltas) == result.text
    _valid(result.text, schema)


def test_json_object_regex_and_choices(engine: LocalEngine) -> None:
    objects = engine.generate(PROMPTS, SamplingParams(max_tokens=120, constraint=JsonObjectConstraint()))
    for out in objects:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
    assert any(o.finish_reason == "stop" for o in objects)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for out in engine.generate(PROMPTS, SamplingParams(max_tokens=30, constraint=RegexConstraint(pattern))):
        assert re.fullmatch(pattern, out.text), out.text
    choices = ("yes", "no", "maybe later")
    for out in engine.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=1.0, seed=0,
                                                       constraint=ChoiceConstraint(choices))):
        assert out.text in choices and out.finish_reason == "stop"


def test_a_finished_grammar_ends_the_request_without_eos(engine: LocalEngine) -> None:
    out = engine.generate(["Hello"], SamplingParams(max_tokens=20, constraint=ChoiceConstraint(("maybe later",))))[0]
    assert out.text == "maybe later" and out.finish_reason == "stop"
    assert out.token_ids[-1] not in engine.eos_token_ids  # ended by the grammar, no extra step for EOS


def test_unconstrained_requests_of_a_mixed_batch_decode_as_without_constraints(engine: LocalEngine) -> None:
    free = SamplingParams(max_tokens=24, ignore_eos=True)  # greedy, float32 on CPU
    alone = engine.generate(PROMPTS, free)
    constrained = SamplingParams(max_tokens=200, constraint=JsonSchemaConstraint.of(SCHEMAS["defs_anyof"]))
    handles = []
    for prompt in PROMPTS:  # interleaved, so both kinds share every decode step
        handles.append(engine.submit(prompt, free))
        handles.append(engine.submit(prompt + " again", constrained))
    mixed = [h.result() for h in handles]
    assert [m.token_ids for m in mixed[::2]] == [a.token_ids for a in alone]
    for m in mixed[1::2]:
        _valid(m.text, SCHEMAS["defs_anyof"])


def test_a_mixed_batch_stays_on_the_overlapped_loop(engine: LocalEngine) -> None:
    """Every decode of a batch mixing free and constrained requests is launched before the step that
    sampled its input was collected (the input is copied on the device), constrained rows included:
    they are masked and sampled late, not held back a step. Their logprobs come back too."""
    before = engine.stats
    free = SamplingParams(max_tokens=16, ignore_eos=True)
    constrained = SamplingParams(max_tokens=120, constraint=JsonSchemaConstraint.of(SCHEMAS["flat"]), logprobs=2)
    handles = [engine.submit(p, free) for p in PROMPTS[:2]] + [engine.submit(p, constrained) for p in PROMPTS[2:]]
    outs = [h.result(timeout=120) for h in handles]
    after = engine.stats
    num_decodes = after["num_decode_tokens"] - before["num_decode_tokens"]
    assert num_decodes >= 2 * 15 and after["num_device_inputs"] - before["num_device_inputs"] == num_decodes
    assert after["num_late_samples"] - before["num_late_samples"] >= sum(len(o.token_ids) for o in outs[2:])
    for out in outs[2:]:
        _valid(out.text, SCHEMAS["flat"])
        assert out.logprobs is not None and [e.token_id for e in out.logprobs] == list(out.token_ids)
        assert all(e.logprob <= 0 and e.top[0][1] >= e.logprob for e in out.logprobs)  # of the masked logits
    assert outs[0].logprobs is None


def test_a_failed_late_sampling_fails_that_step_only(engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.runner.sample_late
    calls = {"n": 0}

    def flaky(handle: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated mask fault")
        real(handle)

    monkeypatch.setattr(engine.runner, "sample_late", flaky)
    failed_before = engine.stats["num_failed_steps"]
    params = SamplingParams(max_tokens=200, constraint=JsonSchemaConstraint.of(SCHEMAS["flat"]))
    with pytest.raises(RuntimeError, match="simulated mask fault"):
        engine.submit("Hello there", params).result(timeout=60)
    assert engine.stats["num_failed_steps"] == failed_before + 1
    _valid(engine.generate(["Hello there"], params)[0].text, SCHEMAS["flat"])
    cached = engine.prefix_cache.num_cached_blocks if engine.prefix_cache is not None else 0
    assert engine.allocator.num_free_blocks + cached == engine.num_kv_blocks


def test_prefix_cache_and_stop_strings_work_with_constraints(engine: LocalEngine) -> None:
    schema = SCHEMAS["flat"]
    prompt = "A paged KV cache stores keys and values in fixed-size blocks shared between requests. " * 2
    params = SamplingParams(max_tokens=200, constraint=JsonSchemaConstraint.of(schema))
    first = engine.generate([prompt], params)[0]
    second = engine.generate([prompt], params)[0]
    assert second.usage.cached_prompt_tokens > 0 and second.token_ids == first.token_ids
    _valid(second.text, schema)
    cut = engine.generate([prompt], SamplingParams(max_tokens=200, stop=('"age"',), constraint=params.constraint))[0]
    assert cut.finish_reason == "stop" and cut.text == first.text[: first.text.index('"age"')]


def test_cancelling_a_constrained_request_frees_it(engine: LocalEngine) -> None:
    handle = engine.submit("Hello", SamplingParams(max_tokens=400, constraint=RegexConstraint("[a-z ]+")))
    next(iter(handle))  # it is decoding
    handle.cancel()
    assert handle.result(timeout=30).finish_reason in ("abort", "stop", "length")
    ok = engine.generate(["Hi"], SamplingParams(max_tokens=50, constraint=JsonSchemaConstraint.of(SCHEMAS["array"])))
    _valid(ok[0].text, SCHEMAS["array"])
    cached = engine.prefix_cache.num_cached_blocks if engine.prefix_cache is not None else 0
    assert engine.allocator.num_free_blocks + cached == engine.num_kv_blocks


def test_invalid_constraints_fail_at_submit_naming_the_problem(engine: LocalEngine) -> None:
    with pytest.raises(InvalidRequestError, match="(?s)invalid regex.*unclosed character class"):
        engine.submit("Hi", SamplingParams(constraint=RegexConstraint("[a-z")))
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    with pytest.raises(InvalidRequestError, match="invalid JSON schema: Invalid type: strin"):
        engine.submit("Hi", SamplingParams(constraint=JsonSchemaConstraint.of(bad)))
    with pytest.raises(InvalidRequestError, match="ignore_eos=True cannot go with a constraint"):
        SamplingParams(ignore_eos=True, constraint=JsonObjectConstraint())
