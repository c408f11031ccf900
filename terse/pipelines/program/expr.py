"""The expressions a program appends to its state: text, chat turns, `gen` and `select`.

They are plain frozen values built in the program's own thread (so mistakes raise right at the line
that wrote them); `ProgramState` executes them in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from terse.backend.constraints import ChoiceConstraint, Constraint, JsonSchemaConstraint, RegexConstraint
from terse.backend.types import Role, SamplingParams
from terse.errors import InvalidRequestError, TerseError


class ProgramError(TerseError):
    """A program is written wrongly (a `gen` inside a user turn, raw text before a chat turn, ...) or one
    of its backend calls failed; the message names the program line that issued it."""


class VariableError(ProgramError, KeyError):
    """A program read a variable that no `gen`/`select` of that state has set."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Gen:
    """Generate text continuing the state and store it under `name` (see `gen`)."""

    name: str | None
    params: SamplingParams

    def describe(self) -> str:
        return f"gen({self.name!r})"


SelectMethod = Literal["logprob", "constrained"]


@dataclass(frozen=True)
class Select:
    """Append one of `choices` and store it under `name` (see `select`)."""

    name: str
    choices: tuple[str, ...]
    method: SelectMethod = "logprob"

    def describe(self) -> str:
        return f"select({self.name!r})"


Part = str | Gen | Select


@dataclass(frozen=True)
class Turn:
    """One chat message; only assistant turns may hold `gen`/`select` parts."""

    role: Role
    parts: tuple[Part, ...]

    def describe(self) -> str:
        return f"{self.role}(...)"


Expr = str | Gen | Select | Turn


def gen(
    name: str | None = None,
    params: SamplingParams | None = None,
    *,
    stop: str | Sequence[str] | None = None,
    regex: str | None = None,
    json_schema: Mapping[str, Any] | str | type | None = None,
    choices: Sequence[str] | None = None,
) -> Gen:
    """Generate a continuation of the state's text with `params` (default `SamplingParams()`), append it
    and store it as variable `name` (unless None). `stop` is shorthand for `params.stop`: it replaces it.

    Structured output (at most one; shorthand for `params.constraint`, which it replaces): `regex` (the
    text fully matches it), `json_schema` (a JSON value valid under the schema: a dict, its JSON text or a
    pydantic model class), `choices` (exactly one of the strings). Backends that decode locally enforce
    them token by token; the openai: backend forwards them to the server.

    Outside an `assistant(...)` turn, after chat messages, the generated text opens the assistant turn.
    """
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ProgramError(f"gen({name!r}, params={params!r}): params must be a terse.SamplingParams")
    if stop is not None:
        params = dataclasses.replace(params, stop=(stop,) if isinstance(stop, str) else tuple(stop))
    constraint = _constraint(name, regex, json_schema, choices)
    if constraint is not None:
        try:
            params = dataclasses.replace(params, constraint=constraint)
        except InvalidRequestError as e:
            raise ProgramError(f"gen({name!r}): {e}") from e
    return Gen(name, params)


def _constraint(
    name: str | None, regex: str | None, json_schema: Mapping[str, Any] | str | type | None, choices: Sequence[str] | None
) -> Constraint | None:
    given = [k for k, v in (("regex", regex), ("json_schema", json_schema), ("choices", choices)) if v is not None]
    if len(given) > 1:
        raise ProgramError(f"gen({name!r}) got {' and '.join(given)}; give at most one of regex, json_schema, choices")
    try:
        if regex is not None:
            return RegexConstraint(regex)
        if choices is not None:
            return ChoiceConstraint(tuple(choices) if not isinstance(choices, str) else choices)  # type: ignore[arg-type]
        if json_schema is not None:
            if isinstance(json_schema, type) and hasattr(json_schema, "model_json_schema"):  # a pydantic model
                return JsonSchemaConstraint.of(json_schema.model_json_schema(), name=json_schema.__name__)
            if isinstance(json_schema, type):
                raise ProgramError(f"gen({name!r}, json_schema={json_schema!r}): give a dict, JSON text or pydantic model")
            return JsonSchemaConstraint.of(json_schema)
    except InvalidRequestError as e:
        raise ProgramError(f"gen({name!r}): {e}") from e
    return None


def select(name: str, choices: Sequence[str], *, method: SelectMethod = "logprob") -> Select:
    """Append one of `choices` and store it as variable `name`.

    method "logprob": the choice the model gives the highest total log-probability (conditioned on the
    state's text, via `Backend.score`; ties go to the earlier choice; `choice_logprobs(name)` gives the
    totals). Needs a backend that returns log-probabilities; others raise `UnsupportedOperationError`.
    method "constrained": one greedy generation restricted to the choices (the `gen(choices=...)` grammar):
    one request instead of one per choice, and it works on any backend that enforces constraints.
    """
    if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ProgramError(
            f"select({name!r}, choices={choices!r}): give a sequence of at least one non-empty string, "
            f"e.g. select({name!r}, ['yes', 'no'])"
        )
    if method not in ("logprob", "constrained"):
        raise ProgramError(f"select({name!r}, method={method!r}): method must be 'logprob' or 'constrained'")
    return Select(name, tuple(choices), method)


def _turn(role: Role, parts: Sequence[Part], *, allow_generation: bool) -> Turn:
    for part in parts:
        if isinstance(part, Gen | Select) and not allow_generation:
            raise ProgramError(
                f"{role}(...) holds {part.describe()}; the model writes only assistant turns, "
                f"so put it in assistant(...)"
            )
        if not isinstance(part, str | Gen | Select):
            raise ProgramError(f"{role}(...) got {part!r}; parts are strings, gen(...) or select(...)")
    return Turn(role, tuple(parts))


def system(*parts: str) -> Turn:
    """A system message made of the given strings (concatenated)."""
    return _turn("system", parts, allow_generation=False)


def user(*parts: str) -> Turn:
    """A user message made of the given strings (concatenated)."""
    return _turn("user", parts, allow_generation=False)


def assistant(*parts: Part) -> Turn:
    """An assistant message: strings are written as given, `gen`/`select` parts come from the model."""
    return _turn("assistant", parts, allow_generation=True)
