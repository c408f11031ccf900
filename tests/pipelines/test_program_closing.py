"""Budget-aware closing in the program DSL: a constrained `gen` with a small max_tokens still yields a
value that parses (single and `run_batch`), and a budget below the shortest output fails at its line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams
from terse.errors import InvalidRequestError
from terse.pipelines.program import ProgramState, assistant, gen, program, user

NOTE = {"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["title", "tags"]}


@pytest.fixture(scope="module")
def engine(tiny_model_factory: Callable[..., Path]) -> Iterator[LocalEngine]:
    eng = LocalEngine.from_spec(str(tiny_model_factory("qwen2", seed=2)), num_kv_blocks=256, max_model_len=1024)
    yield eng
    eng.close()


@program
def note(s: ProgramState, topic: str, budget: int) -> None:
    s += user(f"Write a note about {topic}.")
    s += assistant(gen("note", SamplingParams(max_tokens=budget, temperature=1.0, seed=4), json_schema=NOTE))


def test_small_budget_gens_parse_single_and_batched(engine: LocalEngine) -> None:
    single = note.run("foxes", 30, backend=engine)
    jsonschema.validate(json.loads(single["note"]), NOTE)
    states = note.run_batch([{"topic": f"item {i}", "budget": 24 + 3 * i} for i in range(6)], backend=engine)
    for s in states:
        jsonschema.validate(json.loads(s["note"]), NOTE)


def test_a_budget_below_the_shortest_output_fails_at_its_line(engine: LocalEngine) -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens=3 is too small") as info:
        note.run("foxes", 3, backend=engine)
    assert any("note" in n for n in info.value.__notes__)
