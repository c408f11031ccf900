"""Lazy package exports: a package's heavy names load on first use (PEP 562).

    _LAZY = {"LocalEngine": "terse.backend.local.engine"}     # name -> module that defines it
    __all__ = ["Backend", "LocalEngine"]                       # every public name, eager and lazy
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)

`import terse` then stays light, `terse.LocalEngine` imports its module when first touched, and
`dir(terse)` lists the lazy names beside the eager ones. tests/test_exports.py checks that every name in
each package's `__all__` resolves and that every lazy name is in `__all__`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, lazy: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`, resolving each name of `lazy` from its module on access.

    A name outside `lazy` raises AttributeError as a plain module would. Nothing is cached in the
    package: every access asks the defining module (so patching that module is seen).
    """

    def __getattr__(name: str) -> Any:
        module = lazy.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *lazy})

    return __getattr__, __dir__
