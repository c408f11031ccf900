"""terse: make LLM applications cheaper and faster.

The public API is a handful of names; heavier parts (the program DSL, the server, jobs) load lazily.
"""

from __future__ import annotations

from terse.backend import Backend, Completion, Message, SamplingParams, StreamingKV, Usage, load_backend
from terse.errors import TerseError
from terse.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {  # module -> the names it defines
    "terse.compress": ("PromptCompressor", "Budget"),
    "terse.pipelines.program": (
        "program", "gen", "select", "system", "user", "assistant", "fork", "ProgramState",
    ),
    "terse.pipelines.docqa": ("DocQAJob", "DocQAConfig"),
    "terse.retrieval": ("Retriever",),
    "terse.pipelines.wrap": ("wrap_openai",),
    "terse.backend.local.engine": ("LocalEngine",),
    "terse.backend.local.config": ("EngineConfig",),
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
