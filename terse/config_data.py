"""Nested plain data (a parsed TOML / JSON file) <-> frozen config dataclasses.

    config = config_from_data(DocQAConfig, {"retrieval": {"top_k": 8}})           # defaults fill the rest
    config = config_from_data(DocQAConfig, {"run": {"batch_size": 4}}, base=config)  # overrides of a config
    data = config_to_data(config)                                                  # and back

A table whose field holds a config dataclass (or `SomeConfig | None`) builds that dataclass, starting
from the field's current value (the base's, else the field's default), so a file states only what it
changes, at any depth. Lists become tuples. Every other value goes to the dataclass as written and
its own validation judges it. Errors are one `ConfigError` that names the dotted key:

    unknown key(s) ['topk'] in section 'retrieval'; known: [...]      (at the top: unknown config key(s))
    compression.budget.rate=1.5 must be a number in (0, 1], e.g. 0.25
    run.runner is now run.dispatch; rename the key      (keys listed in `renamed`)

A dataclass may declare `one_of: ClassVar[tuple[str, ...]]`: fields of which one is set at a time;
data that sets one of them clears the others it does not set (`Budget`: target_tokens or rate).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from terse.errors import ConfigError

T = TypeVar("T")


def config_from_data(
    cls: type[T],
    data: object,
    *,
    base: T | None = None,
    path: str = "",
    renamed: Mapping[str, str] | None = None,
) -> T:
    """`cls` built from `data` (a mapping of its field names), on top of `base` when given.

    `path` is the dotted location of `data` in the whole document ("" at the top), used in messages;
    `renamed` maps dotted keys of earlier file layouts to their new names.
    """
    where = f"section {path!r}" if path else "the config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table / object, got {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    _check_keys(data, known, path, renamed or {})
    values: dict[str, Any] = {}
    for key, value in data.items():
        nested = _nested_type(cls, key)
        if nested is not None and not isinstance(value, Mapping | nested) and value is not None:
            raise ConfigError(f"{_join(path, key)}={value!r} must be a table / object of {nested.__name__} fields")
        if nested is not None and isinstance(value, Mapping):
            current = getattr(base, key) if base is not None else _default(known[key])
            values[key] = config_from_data(
                nested, value, base=current if isinstance(current, nested) else None,
                path=_join(path, key), renamed=renamed,
            )
        else:
            values[key] = tuple(value) if isinstance(value, list) else value
    one_of: tuple[str, ...] = getattr(cls, "one_of", ())
    if base is not None and any(values.get(key) is not None for key in one_of):
        values.update({other: None for other in one_of if other not in values})
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)  # type: ignore[type-var]
    except (TypeError, ValueError) as e:
        raise ConfigError(_located(path, str(e), known)) from e


def config_to_data(config: object) -> dict[str, Any]:
    """Plain nested data of a config dataclass: `config_from_data(type(c), config_to_data(c)) == c`."""
    return dataclasses.asdict(config)  # type: ignore[call-overload, no-any-return]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(data: Mapping[str, Any], known: Mapping[str, Any], path: str, renamed: Mapping[str, str]) -> None:
    for key in data:
        new = renamed.get(_join(path, key))
        if new is not None:
            raise ConfigError(f"{_join(path, key)} is now {new}; rename the key")
    unknown = sorted(str(k) for k in set(data) - set(known))
    if unknown:
        what = f"key(s) {unknown} in section {path!r}" if path else f"config key(s) {unknown}"
        raise ConfigError(f"unknown {what}; known: {sorted(known)}")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # a name only imported for type checking: no nested configs known
        return {}


def _nested_type(cls: type, key: str) -> type | None:
    """The config dataclass a field holds (`X` or `X | None`), else None."""
    hint = _field_types(cls).get(key)
    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    candidates = typing.get_args(hint) if is_union else (hint,)
    found = [c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)]
    return found[0] if len(found) == 1 else None


def _located(path: str, message: str, names: Mapping[str, Any]) -> str:
    """`message` with the dotted path of the field it names ("top_k=0 ..." -> "retrieval.top_k=0 ...")."""
    if not path or message.startswith(f"{path}.") or message.startswith(f"{path}:"):
        return message
    if any(message.startswith(f"{name}=") for name in names):
        return f"{path}.{message}"
    return f"{path}: {message}"
