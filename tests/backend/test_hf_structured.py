"""The transformers backend applies the same grammar masks: valid outputs, untouched neighbours."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from terse.backend.constraints import JsonSchemaConstraint, RegexConstraint
from terse.backend.hf import HFBackend
from terse.backend.types import SamplingParams
from tests.backend.structured_cases import SCHEMAS

PROMPTS = ["Alice works at", "The quick brown fox jumps", "Numbers like 3.14"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def backend(request: pytest.FixtureRequest, tiny_model_factory: Callable[..., Path]) -> Iterator[HFBackend]:
    b = HFBackend(tiny_model_factory(request.param), max_batch_size=8, device="cpu", dtype="float32")
    yield b
    b.close()


def test_constrained_rows_validate_and_free_rows_are_untouched(backend: HFBackend) -> None:
    free = SamplingParams(max_tokens=12, ignore_eos=True)
    schema = SCHEMAS["nested"]
    constrained = SamplingParams(max_tokens=120, constraint=JsonSchemaConstraint.of(schema))
    baseline = [backend.submit(p, free) for p in PROMPTS]  # one batch, all free
    expected = [h.result().token_ids for h in baseline]
    handles = [backend.submit(p, free if i != 1 else constrained) for i, p in enumerate(PROMPTS)]  # one batch, mixed
    results = [h.result() for h in handles]
    assert [results[0].token_ids, results[2].token_ids] == [expected[0], expected[2]]
    assert results[1].finish_reason == "stop"
    jsonschema.validate(json.loads(results[1].text), schema)
    streamed = backend.submit("Hello", SamplingParams(max_tokens=30, constraint=RegexConstraint("[a-c]{3}-[0-9]{2}")))
    text = "".join(streamed)
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", text) and streamed.result().finish_reason == "stop"
