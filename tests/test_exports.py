"""Every package's `__all__` names resolve, lazy names included, and `dir()` lists them."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import terse
from terse.lazy import lazy_exports, lazy_names

ROOT = Path(terse.__file__).parent
PACKAGES = sorted(
    ".".join(("terse", *init.parent.relative_to(ROOT).parts)) for init in ROOT.rglob("__init__.py")
)


@pytest.mark.parametrize("name", PACKAGES)
def test_every_public_name_resolves(name):
    package = importlib.import_module(name)
    public = getattr(package, "__all__", [])
    missing = [n for n in public if not hasattr(package, n)]
    assert not missing, f"{name}.__all__ names that do not resolve: {missing}"
    assert set(public) <= set(dir(package))
    lazy = set(lazy_names(getattr(package, "_LAZY", {})))
    assert lazy <= set(public), f"{name}: lazy names missing from __all__: {lazy - set(public)}"


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="module 'terse.kernels' has no attribute 'nope'"):
        importlib.import_module("terse.kernels").nope  # noqa: B018


def test_a_name_listed_under_two_modules_is_refused():
    with pytest.raises(ValueError, match="'x' is listed under a and b"):
        lazy_exports("pkg", {"a": ("x",), "b": ("x", "y")})
