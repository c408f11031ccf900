"""Constrained `gen` (regex / json_schema / choices) and `select(method="constrained")` in the program
DSL, on transformers, terse's engine and over HTTP; run_batch keeps constrained requests batched."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel, Field

import terse
from terse.backend.base import Backend
from terse.backend.local.engine import LocalEngine
from terse.backend.types import SamplingParams
from terse.errors import InvalidRequestError
from terse.pipelines.program import ProgramError, ProgramState, assistant, gen, program, select, user
from tests.backend.structured_cases import SCHEMAS
from tests.conftest import backend_over_http


class Point(BaseModel):
    x: int = Field(ge=0, le=9)
    label: str = Field(max_length=8)


@pytest.fixture(scope="module", params=["hf", "local", "openai"])
def backend(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[Backend]:
    if request.param != "openai":
        b = terse.load_backend(f"{request.param}:{tiny_llama}")
        yield b
        b.close()
        return
    with backend_over_http(tiny_llama) as remote:
        yield remote


@program
def fill(s: ProgramState, topic: str) -> None:
    s += user(f"Describe {topic}.")
    s += assistant(
        gen("record", SamplingParams(max_tokens=150), json_schema=SCHEMAS["nested"]),
        " code: ",
        gen("code", SamplingParams(max_tokens=20), regex=r"[A-Z]{2}-[0-9]{3}"),
        " point: ",
        gen("point", SamplingParams(max_tokens=60), json_schema=Point),
        " verdict: ",
        gen("verdict", choices=["good", "bad"]),
        " then ",
        select("next", ["stop", "go on"], method="constrained"),
    )


def test_constrained_gen_and_select_on_every_backend(backend: Backend) -> None:
    out = fill.run("a fox", backend=backend)
    jsonschema.validate(json.loads(out["record"]), SCHEMAS["nested"])
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", out["code"])
    Point.model_validate_json(out["point"])
    assert out["verdict"] in ("good", "bad") and out["next"] in ("stop", "go on")
    assert out.messages[-1]["content"].endswith(out["next"])


def test_run_batch_keeps_constrained_requests_batched(tiny_llama: Path) -> None:
    engine = LocalEngine.from_spec(str(tiny_llama), num_kv_blocks=256, max_model_len=1024)
    try:
        states = fill.run_batch([{"topic": f"item {i}"} for i in range(8)], backend=engine)
        for s in states:
            jsonschema.validate(json.loads(s["record"]), SCHEMAS["nested"])
        stats = engine.stats
        # 8 programs x 5 constrained calls: decode steps carry several requests each
        assert stats["num_decode_tokens"] / stats["num_steps"] > 3
    finally:
        engine.close()


def test_constraint_mistakes_name_the_gen() -> None:
    with pytest.raises(ProgramError, match="regex and choices"):
        gen("x", regex="a", choices=["a"])
    with pytest.raises(ProgramError, match="gen\\('x'\\).*non-empty"):
        gen("x", choices=[""])
    with pytest.raises(ProgramError, match="pydantic model"):
        gen("x", json_schema=int)
    with pytest.raises(ProgramError, match="method must be"):
        select("x", ["a"], method="best")  # type: ignore[arg-type]


def test_an_invalid_regex_fails_the_run_at_its_line(tiny_llama: Path) -> None:
    @program
    def broken(s: ProgramState) -> None:
        s += user("Hi")
        s += assistant(gen("x", regex="[a-"))

    engine = LocalEngine.from_spec(str(tiny_llama), num_kv_blocks=64, max_model_len=512)
    try:
        with pytest.raises(InvalidRequestError, match="invalid regex") as info:
            broken.run(backend=engine)
        assert any("broken" in note for note in info.value.__notes__)
    finally:
        engine.close()
