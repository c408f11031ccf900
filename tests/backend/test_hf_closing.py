"""Budget-aware closing in the transformers backend: small budgets still give valid values, outputs that
finish on their own are unchanged, and a budget below the shortest output is refused."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from terse.backend.constraints import JsonObjectConstraint, JsonSchemaConstraint
from terse.backend.hf import HFBackend
from terse.backend.types import SamplingParams
from terse.errors import InvalidRequestError
from tests.backend.structured_cases import SCHEMAS

PROMPTS = ["Record 0: describe", "The quick brown fox", "Alice works at Acme"]


@pytest.fixture(scope="module")
def backend(tiny_model_factory: Callable[..., Path]) -> Iterator[HFBackend]:
    b = HFBackend(tiny_model_factory("qwen2", seed=2), max_batch_size=8, device="cpu", dtype="float32")
    yield b
    b.close()


def test_small_budgets_close_into_valid_values(backend: HFBackend) -> None:
    obj = JsonObjectConstraint()
    num_length = 0
    for name in ("nested", "defs_anyof"):
        constraint = JsonSchemaConstraint.of(SCHEMAS[name])
        shortest = backend._grammar.compile(constraint).shortest_len()
        assert shortest is not None
        for budget in (shortest, shortest + 9):
            params = SamplingParams(max_tokens=budget, temperature=1.0, seed=2, constraint=constraint)
            for out in backend.generate(PROMPTS, params):
                jsonschema.validate(json.loads(out.text), SCHEMAS[name])
                num_length += out.finish_reason == "length"
    for out in backend.generate(PROMPTS, SamplingParams(max_tokens=12, constraint=obj)):
        assert isinstance(json.loads(out.text), dict) and len(out.token_ids) <= 12
        num_length += out.finish_reason == "length"
    assert num_length > 0


def test_outputs_that_finish_on_their_own_are_unchanged_and_tiny_budgets_refused(backend: HFBackend) -> None:
    constraint = JsonSchemaConstraint.of(SCHEMAS["optional"])
    free = backend.generate(PROMPTS, SamplingParams(max_tokens=300, constraint=constraint))
    finished = [(p, o) for p, o in zip(PROMPTS, free) if o.finish_reason == "stop"]
    assert finished
    for prompt, out in finished:
        for extra in (0, 2):
            capped = backend.generate([prompt], SamplingParams(max_tokens=len(out.token_ids) + extra, constraint=constraint))[0]
            assert (capped.token_ids, capped.finish_reason) == (out.token_ids, "stop")
    with pytest.raises(InvalidRequestError, match="max_tokens=3 is too small") as e:
        backend.submit(PROMPTS[0], SamplingParams(max_tokens=3, constraint=constraint))
    assert e.value.param == "max_tokens"
