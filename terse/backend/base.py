"""The `Backend` protocol: the one contract every layer of terse uses to reach a model.

Three implementations stand behind it: the local engine (`local:`), plain transformers (`hf:`) and any
OpenAI-compatible server (`openai:`). Layers above never know which one they hold.

Contract:
- `submit()` never blocks on generation; it validates the request (raising `InvalidRequestError` at
  once for a bad one) and returns a `RequestHandle`. A failure while running fails only that handle.
- `generate()` submits every prompt before waiting, so a batching backend runs them together; results
  come back in input order.
- `score()` returns per-token log-probabilities of each text conditioned on `prefix` (see
  `TokenScores`); backends that cannot raise `UnsupportedOperationError`.
- `render_chat()` applies the model's chat template and returns the prompt string, ending where the
  assistant's reply starts.
- `count_tokens()`, `encode()` and `decode()` use the model's own tokenizer; `encode()` adds no special
  tokens, so `count_tokens(a + b)` may differ from the sum only at the seam.
- `close()` releases threads, memory and connections; backends are context managers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from terse.backend.handle import RequestHandle
from terse.backend.types import Completion, Message, SamplingParams, TokenScores


@runtime_checkable
class Backend(Protocol):
    """What every model backend offers. See the module docstring for the contract."""

    @property
    def model_name(self) -> str:
        """The model's name as the backend reports it (path, hub name or served model id)."""
        ...

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold."""
        ...

    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestHandle: ...

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams) -> list[Completion]: ...

    def score(self, texts: Sequence[str], *, prefix: str = "") -> list[TokenScores]: ...

    def render_chat(self, messages: Sequence[Message]) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def close(self) -> None: ...


class BackendBase(ABC):
    """Shared plumbing for implementations: `generate()` over `submit()`, context management.

    Subclasses implement `submit`, `score`, `render_chat`, `encode`, `decode`, `close` and the two
    properties; they inherit a `generate()` that submits all prompts first, then waits for all.
    """

    @abstractmethod
    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestHandle:
        """Validate and enqueue one request (see the module docstring)."""

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams) -> list[Completion]:
        handles = [self.submit(p, params) for p in prompts]
        return [h.result() for h in handles]

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` in the model's tokenizer, no special tokens added."""

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def close(self) -> None:
        return None

    def __enter__(self) -> BackendBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
