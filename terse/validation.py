"""Value checks shared by every config and launcher: a failure names the value, the limit and a fix.

    require(ok, message)                                  the general form
    check_int("top_k", 0, low=1, example=4)               "top_k=0 must be an int >= 1, e.g. 4"
    check_range("rate", 1.5, 0, 1, low_open=True)         "rate=1.5 must be a number in (0, 1]"
    check_choice("mode", "x", ("dense", "bm25"))          "mode='x' must be one of 'dense' or 'bm25'"
    check_strings("stop", ("",))                          "stop=('',) must be a tuple of non-empty strings"

Each raises `ConfigError` unless given another error type (kernel launchers raise `KernelInputError`).
Booleans are not ints here: `top_k=True` is refused. No imports beyond terse.errors, so every layer
(kernels included) can use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from terse.errors import ConfigError

ErrorType = type[Exception]


def require(ok: bool, message: str, error: ErrorType = ConfigError) -> None:
    """Raise `error(message)` unless `ok`."""
    if not ok:
        raise error(message)


def _hint(example: object) -> str:
    return "" if example is None else f", e.g. {example}"


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    name: str,
    value: object,
    *,
    low: int | None = None,
    high: int | None = None,
    example: object = None,
    error: ErrorType = ConfigError,
) -> None:
    """`value` is an int within [low, high] (either bound may be left open by passing None)."""
    if is_int(value):
        assert isinstance(value, int)
        if (low is None or value >= low) and (high is None or value <= high):
            return
    if low is not None and high is not None:
        limit = f"an int in [{low}, {high}]"
    elif low is not None:
        limit = f"an int >= {low}"
    elif high is not None:
        limit = f"an int <= {high}"
    else:
        limit = "an int"
    raise error(f"{name}={value!r} must be {limit}{_hint(example)}")


def check_range(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    example: object = None,
    error: ErrorType = ConfigError,
) -> None:
    """`value` is a finite number (int or float, not bool) in the interval; `*_open` excludes that bound."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        assert isinstance(value, int | float)
        ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise error(f"{name}={value!r} must be a number in {interval}{_hint(example)}")


def check_choice(name: str, value: object, choices: Sequence[object], *, error: ErrorType = ConfigError) -> None:
    """`value` is one of `choices` (None may be one of them)."""
    if value in choices:
        return
    names = [repr(c) if c is not None else "None" for c in choices]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    raise error(f"{name}={value!r} must be one of {listed}")


def check_strings(name: str, value: object, *, example: object = None, error: ErrorType = ConfigError) -> None:
    """`value` is a tuple of non-empty strings (a bare string is refused: it would iterate by character)."""
    ok = isinstance(value, tuple) and all(isinstance(s, str) and s for s in value)
    require(ok, f"{name}={value!r} must be a tuple of non-empty strings{_hint(example)}", error)
