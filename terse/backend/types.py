"""Value types of the Backend contract: sampling parameters, results, usage, token scores, messages.

All are frozen dataclasses validated on construction, so a bad value fails where it was written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, TypedDict

from terse.backend.constraints import CONSTRAINT_TYPES, Constraint
from terse.errors import InvalidRequestError

FinishReason = Literal["stop", "length", "abort"]
Role = Literal["system", "user", "assistant", "tool"]


class Message(TypedDict):
    """One chat message, in the OpenAI shape (`{"role": ..., "content": ...}`)."""

    role: Role
    content: str


@dataclass(frozen=True)
class StreamingKV:
    """Per-request streaming KV policy: keep `sink_tokens` first tokens plus `window_tokens` recent ones.

    Memory stays bounded however long the sequence runs; below `sink_tokens + window_tokens` tokens the
    output equals the dense cache. Only the local engine honours it; other backends reject it.
    """

    sink_tokens: int = 4
    """Initial "attention sink" tokens kept for the whole life of the sequence."""
    window_tokens: int = 4096
    """Most recent tokens kept; older ones (after the sinks) are released block by block."""

    def __post_init__(self) -> None:
        if self.sink_tokens < 0:
            raise InvalidRequestError(f"sink_tokens={self.sink_tokens} must be >= 0 (4 is usual)")
        if self.window_tokens < 1:
            raise InvalidRequestError(f"window_tokens={self.window_tokens} must be >= 1 (e.g. 4096)")


MAX_TOP_LOGPROBS = 20
"""Most alternatives per generated token `SamplingParams.logprobs` may ask for (OpenAI's limit)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens at its position."""

    token_id: int
    logprob: float
    """log P(token_id | everything before it), of the model's distribution before temperature and top-p."""
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability) of the most likely tokens at this position, most likely first."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. Passed whole through every layer; never split into loose kwargs."""

    max_tokens: int = 256
    """Most tokens to generate (>= 1 counts, 0 is allowed only for scoring-like calls that want prefill)."""
    temperature: float = 0.0
    """0 means greedy (argmax); > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p, in (0, 1]."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion; the stop string itself is not part of the returned text."""
    seed: int | None = None
    """Per-request seed: the same seed, prompt and params give the same sample on the same backend."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (fixed-length outputs for benchmarks)."""
    streaming_kv: StreamingKV | None = None
    """Use a sink + window KV cache for this request (local engine only); None means the engine default."""
    constraint: Constraint | None = None
    """Structured output: the completion must match this regex / JSON schema / choice / grammar / tool-call
    format (see terse.backend.constraints); None leaves it free."""
    logprobs: int | None = None
    """Return each generated token's log-probability and its `logprobs` most likely alternatives
    (0..20) in `Completion.logprobs`; None returns none. Values are of the model's own distribution
    (before temperature and top-p), as OpenAI reports them."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple):
            raise InvalidRequestError(
                f"stop={self.stop!r} must be a tuple of strings, e.g. stop=('\\n\\n',)"
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise InvalidRequestError(f"max_tokens={self.max_tokens!r} must be an int >= 0")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)) or (
            self.temperature < 0
        ):
            raise InvalidRequestError(
                f"temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)"
            )
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p={self.top_p!r} must be in (0, 1]; use 1.0 to disable it")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise InvalidRequestError(f"stop={self.stop!r} must hold non-empty strings only")
        if self.constraint is not None and not isinstance(self.constraint, CONSTRAINT_TYPES):
            raise InvalidRequestError(
                f"constraint={self.constraint!r} must be one of {[c.__name__ for c in CONSTRAINT_TYPES]} or None"
            )
        if self.constraint is not None and self.ignore_eos:
            raise InvalidRequestError("ignore_eos=True cannot go with a constraint: the grammar decides where it ends")
        if self.logprobs is not None and not (
            isinstance(self.logprobs, int) and not isinstance(self.logprobs, bool) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise InvalidRequestError(
                f"logprobs={self.logprobs!r} must be an int in 0..{MAX_TOP_LOGPROBS} (alternatives per token) or None"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Usage:
    """Token accounting of one request."""

    prompt_tokens: int
    """Tokens in the prompt as the model saw it."""
    cached_prompt_tokens: int
    """Prompt tokens whose KV came from a prefix cache instead of being prefilled."""
    completion_tokens: int
    """Tokens generated."""
    num_draft_tokens: int = 0
    """Speculative decoding (local engine): draft tokens verified for this request."""
    num_accepted_tokens: int = 0
    """Of those, accepted (each saved the request a forward step)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.cached_prompt_tokens + other.cached_prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.num_draft_tokens + other.num_draft_tokens,
            self.num_accepted_tokens + other.num_accepted_tokens,
        )


ZERO_USAGE = Usage(0, 0, 0)


@dataclass(frozen=True)
class Completion:
    """The finished result of one request."""

    text: str
    """Generated text, without the prompt and without a matched stop string."""
    token_ids: tuple[int, ...]
    """Generated token ids (a stop string's tokens are included if they were generated)."""
    finish_reason: FinishReason
    """"stop" (EOS or a stop string), "length" (max_tokens or model length), "abort" (cancelled)."""
    usage: Usage
    metrics: dict[str, float] = field(default_factory=dict, compare=False)
    """Timings in seconds where the backend knows them: "ttft", "latency"."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One entry per generated token (an ending EOS excluded) when `SamplingParams.logprobs` was set."""


@dataclass(frozen=True)
class TokenScores:
    """Per-token log-probabilities of one text, as returned by `Backend.score()`.

    `logprobs[i]` is log P(token_ids[i] | prefix, token_ids[:i]). With an empty prefix the backend
    conditions on the BOS token when the model has one; otherwise `logprobs[0]` is NaN.
    `offsets[i]` is the (start, end) character span of token i in the scored text (not the prefix).
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    offsets: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not (len(self.token_ids) == len(self.logprobs) == len(self.offsets)):
            raise ValueError(
                f"TokenScores lengths differ: {len(self.token_ids)} ids, {len(self.logprobs)} logprobs, "
                f"{len(self.offsets)} offsets"
            )

    @property
    def total_logprob(self) -> float:
        return float(sum(lp for lp in self.logprobs if not math.isnan(lp)))
