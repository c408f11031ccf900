"""Backends: the contract (types, handle, protocol), the registry, and the implementations.

Implementations are imported lazily through `load_backend()` so `import terse.backend` stays light.
"""

from terse.backend.base import Backend, BackendBase
from terse.backend.handle import RequestHandle
from terse.backend.registry import load_backend, parse_spec, register_backend
from terse.backend.types import (
    ZERO_USAGE,
    Completion,
    FinishReason,
    Message,
    SamplingParams,
    StreamingKV,
    TokenLogprob,
    TokenScores,
    Usage,
)

__all__ = [
    "ZERO_USAGE",
    "Backend",
    "BackendBase",
    "Completion",
    "FinishReason",
    "Message",
    "RequestHandle",
    "SamplingParams",
    "StreamingKV",
    "TokenLogprob",
    "TokenScores",
    "Usage",
    "load_backend",
    "parse_spec",
    "register_backend",
]
