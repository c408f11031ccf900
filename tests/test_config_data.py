"""terse.config_data: nested plain data <-> frozen config dataclasses, errors naming the dotted key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from terse.config_data import config_from_data, config_to_data
from terse.errors import ConfigError
from terse.validation import check_int, require


@dataclass(frozen=True)
class Inner:
    size: int = 8
    """A positive int."""
    tags: tuple[str, ...] = ()
    """Any strings."""

    def __post_init__(self) -> None:
        check_int("size", self.size, low=1)


@dataclass(frozen=True)
class Choice:
    one_of: ClassVar[tuple[str, ...]] = ("a", "b")
    a: int | None = 1
    b: int | None = None

    def __post_init__(self) -> None:
        require((self.a is None) != (self.b is None), "give exactly one of a and b")


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = Inner(size=4)
    maybe: Inner | None = None
    choice: Choice = field(default_factory=Choice)


def test_defaults_fill_what_the_data_leaves_out() -> None:
    built = config_from_data(Outer, {"inner": {"tags": ["p", "q"]}, "maybe": {"size": 2}})
    assert built == Outer(inner=Inner(size=4, tags=("p", "q")), maybe=Inner(size=2))  # the field's default kept size 4
    assert config_from_data(Outer, config_to_data(built)) == built


def test_overrides_start_from_the_base() -> None:
    base = Outer(inner=Inner(size=16))
    assert config_from_data(Outer, {"inner": {"tags": ["t"]}}, base=base).inner == Inner(size=16, tags=("t",))
    assert config_from_data(Outer, {"choice": {"b": 3}}, base=base).choice == Choice(a=None, b=3)
    with pytest.raises(ConfigError, match="choice: give exactly one of a and b"):
        config_from_data(Outer, {"choice": {"a": None}}, base=base)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"inner": {"size": 0}}, "inner.size=0 must be an int >= 1"),
        ({"inner": {"sise": 3}}, "unknown key(s) ['sise'] in section 'inner'; known: ['size', 'tags']"),
        ({"nmae": "y"}, "unknown config key(s) ['nmae']"),
        ({"inner": 3}, "inner=3"),
        ({"maybe": {"size": -1}}, "maybe.size=-1"),
        ({"old": 1}, "old is now name; rename the key"),
    ],
)
def test_errors_name_the_dotted_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_data(Outer, data, renamed={"old": "name"})
    assert message in str(info.value)


def test_a_section_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(ConfigError, match="section 'inner' must be a table"):
        config_from_data(Inner, [1], path="inner")
