"""terse.validation: each check accepts what it promises and names the value, the limit and an example."""

from __future__ import annotations

import math

import pytest

from terse.errors import ConfigError, KernelInputError
from terse.validation import check_choice, check_int, check_range, check_strings, require


def test_require_raises_the_given_type() -> None:
    require(True, "never")
    with pytest.raises(ConfigError, match="bad"):
        require(False, "bad")
    with pytest.raises(KernelInputError, match="bad"):
        require(False, "bad", KernelInputError)


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, {"low": 1, "example": 4}, "top_k=0 must be an int >= 1, e.g. 4"),
        (True, {"low": 0}, "top_k=True must be an int >= 0"),
        (2.0, {}, "top_k=2.0 must be an int"),
        (9, {"low": 1, "high": 8}, "top_k=9 must be an int in [1, 8]"),
        (9, {"high": 8}, "top_k=9 must be an int <= 8"),
    ],
)
def test_check_int_refuses(value: object, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_int("top_k", value, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_check_int_accepts_the_bounds() -> None:
    check_int("n", 1, low=1, high=1)
    check_int("n", -5)


@pytest.mark.parametrize(
    ("value", "kwargs", "ok"),
    [
        (1.0, {"low_open": True}, True),
        (0.0, {"low_open": True}, False),
        (0.0, {}, True),
        (1.0, {"high_open": True}, False),
        (1, {}, True),
        (math.nan, {}, False),
        (math.inf, {}, False),
        (False, {}, False),
        ("0.5", {}, False),
    ],
)
def test_check_range(value: object, kwargs: dict[str, bool], ok: bool) -> None:
    if ok:
        check_range("rate", value, 0.0, 1.0, **kwargs)
        return
    with pytest.raises(ConfigError, match=r"rate=.* must be a number in [\[(]0.0, 1.0[\])]"):
        check_range("rate", value, 0.0, 1.0, **kwargs)


def test_check_choice_lists_the_choices() -> None:
    check_choice("mode", None, ("a", None))
    with pytest.raises(ConfigError) as info:
        check_choice("mode", "c", ("a", "b", None))
    assert str(info.value) == "mode='c' must be one of 'a', 'b' or None"
    with pytest.raises(KernelInputError, match="block=48 must be one of 16 or 32"):
        check_choice("block", 48, (16, 32), error=KernelInputError)


def test_check_strings_refuses_a_bare_string_and_empty_items() -> None:
    check_strings("stop", ("\n",))
    check_strings("stop", ())
    for bad in ("\n", ("",), ["x"], (1,)):
        with pytest.raises(ConfigError, match="must be a tuple of non-empty strings"):
            check_strings("stop", bad)
