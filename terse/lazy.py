"""Lazy package exports: a package's heavy names load on first use (PEP 562).

    _LAZY = {"terse.backend.local.engine": ("LocalEngine",)}    # module -> the names it defines
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)
    __all__ = ["Backend", "LocalEngine"]                         # every public name, eager and lazy

`import terse` then stays light, `terse.LocalEngine` imports its module when first touched, and
`dir(terse)` lists the lazy names beside the eager ones. A package whose names are all lazy writes
`__all__ = lazy_names(_LAZY)`. tests/test_exports.py checks that every name in each package's `__all__`
resolves and that every lazy name is in `__all__`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_names(modules: Mapping[str, Sequence[str]]) -> list[str]:
    """Every name of a `module -> names` table, sorted (an all-lazy package's `__all__`)."""
    return sorted(name for names in modules.values() for name in names)


def lazy_exports(
    package: str, modules: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`, resolving each name of `modules` from its module on access.

    A name outside the table raises AttributeError as a plain module would. Nothing is cached in the
    package: every access asks the defining module (so patching that module is seen).
    """
    defined_in: dict[str, str] = {}
    for module, names in modules.items():
        for name in names:
            if name in defined_in:
                raise ValueError(f"{package}: {name!r} is listed under {defined_in[name]} and {module}; keep one")
            defined_in[name] = module

    def __getattr__(name: str) -> Any:
        module = defined_in.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *defined_in})

    return __getattr__, __dir__
