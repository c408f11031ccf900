"""terse: make LLM applications cheaper and faster.

The public API is a handful of names; heavier parts (the program DSL, the server, jobs) load lazily.
"""

from __future__ import annotations

from terse.backend import Backend, Completion, Message, SamplingParams, StreamingKV, Usage, load_backend
from terse.errors import TerseError
from terse.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # name -> module that defines it
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


__all__ = [
    "Backend",
    "Budget",
    "Completion",
    "DocQAConfig",
    "DocQAJob",
    "EngineConfig",
    "LocalEngine",
    "Message",
    "ProgramState",
    "PromptCompressor",
    "Retriever",
    "SamplingParams",
    "StreamingKV",
    "TerseError",
    "Usage",
    "assistant",
    "fork",
    "gen",
    "load_backend",
    "program",
    "select",
    "system",
    "user",
    "wrap_openai",
]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
