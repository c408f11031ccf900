"""`load_backend(spec)`: build a backend from a spec string, importing only the backend asked for.

Specs: `local:<path-or-name>` (terse's engine), `hf:<path-or-name>` (plain transformers),
`openai:<base_url>#<model>` (any OpenAI-compatible server).
"""

from __future__ import annotations

import importlib
from typing import Any

from terse.backend.base import Backend
from terse.errors import ConfigError

# scheme -> "module:factory"; the factory takes (target: str, **config) and returns a Backend.
_REGISTRY: dict[str, str] = {
    "local": "terse.backend.local.engine:LocalEngine.from_spec",
    "hf": "terse.backend.hf:HFBackend.from_spec",
    "openai": "terse.backend.openai:OpenAIBackend.from_spec",
}


def register_backend(scheme: str, factory: str) -> None:
    """Register `scheme:` specs to `"module:callable"` (a dotted attribute path is allowed)."""
    _REGISTRY[scheme] = factory


def parse_spec(spec: str) -> tuple[str, str]:
    """Split `"scheme:target"`; raise `ConfigError` naming the known schemes when it does not parse."""
    scheme, sep, target = spec.partition(":")
    if not sep or scheme not in _REGISTRY or not target:
        known = ", ".join(f"'{s}:...'" for s in sorted(_REGISTRY))
        raise ConfigError(
            f"backend spec {spec!r} is not of the form <scheme>:<target>; known schemes: {known} "
            f"(e.g. 'local:path/to/model', 'openai:http://127.0.0.1:8000/v1#my-model')"
        )
    return scheme, target


def load_backend(spec: str, **config: Any) -> Backend:
    """Build the backend a spec names; `config` goes to that backend's factory (e.g. EngineConfig fields)."""
    scheme, target = parse_spec(spec)
    module_name, _, attr_path = _REGISTRY[scheme].partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"backend {scheme!r} is not available in this installation ({e}); "
            f"install terse with the extra it needs"
        ) from e
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    backend: Backend = obj(target, **config)
    return backend
