"""terse: make LLM applications cheaper and faster.

The public API is a handful of names; heavier parts (the program DSL, the server, jobs) load lazily.
"""

from __future__ import annotations

from typing import Any

from terse.backend import Backend, Completion, Message, SamplingParams, StreamingKV, Usage, load_backend
from terse.errors import TerseError

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # name -> module that defines it; filled in as the layers land
    "PromptCompressor": "terse.compress",
    "Budget": "terse.compress",
    "program": "terse.pipelines.program",
    "gen": "terse.pipelines.program",
    "select": "terse.pipelines.program",
    "system": "terse.pipelines.program",
    "user": "terse.pipelines.program",
    "assistant": "terse.pipelines.program",
    "fork": "terse.pipelines.program",
    "ProgramState": "terse.pipelines.program",
    "DocQAJob": "terse.pipelines.docqa",
    "DocQAConfig": "terse.pipelines.docqa",
    "Retriever": "terse.retrieval",
    "wrap_openai": "terse.pipelines.wrap",
    "LocalEngine": "terse.backend.local.engine",
    "EngineConfig": "terse.backend.local.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'terse' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "Backend",
    "Completion",
    "Message",
    "SamplingParams",
    "StreamingKV",
    "TerseError",
    "Usage",
    "load_backend",
]
