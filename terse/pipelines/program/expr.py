"""The expressions a program appends to its state: text, chat turns, `gen` and `select`.

They are plain frozen values built in the program's own thread (so mistakes raise right at the line
that wrote them); `ProgramState` executes them in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from terse.backend.types import Role, SamplingParams
from terse.errors import TerseError


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


@dataclass(frozen=True)
class Select:
    """Append the choice with the highest total log-probability and store it under `name` (see `select`)."""

    name: str
    choices: tuple[str, ...]

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
    name: str | None = None, params: SamplingParams | None = None, *, stop: str | Sequence[str] | None = None
) -> Gen:
    """Generate a continuation of the state's text with `params` (default `SamplingParams()`), append it
    and store it as variable `name` (unless None). `stop` is shorthand for `params.stop`: it replaces it.

    Outside an `assistant(...)` turn, after chat messages, the generated text opens the assistant turn.
    """
    params = params if params is not None else SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ProgramError(f"gen({name!r}, params={params!r}): params must be a terse.SamplingParams")
    if stop is not None:
        params = dataclasses.replace(params, stop=(stop,) if isinstance(stop, str) else tuple(stop))
    return Gen(name, params)


def select(name: str, choices: Sequence[str]) -> Select:
    """Append whichever of `choices` the model gives the highest total log-probability (conditioned on
    the state's text, via `Backend.score`) and store it as variable `name`. Ties go to the earlier choice.

    Needs a backend that returns log-probabilities; others raise `UnsupportedOperationError`.
    """
    if isinstance(choices, str) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ProgramError(
            f"select({name!r}, choices={choices!r}): give a sequence of at least one non-empty string, "
            f"e.g. select({name!r}, ['yes', 'no'])"
        )
    return Select(name, tuple(choices))


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
