"""Per-request state of the local engine: token ids and progress counters.

Index arithmetic of one sequence (10 prompt tokens, 2 generated, one more sampled on the device):

    token_ids:  p0 p1 p2 p3 p4 p5 p6 p7 p8 p9 g0 g1 [?]
    num_cached_tokens = 8     (p0..p7 came from the prefix cache)
    num_computed_tokens = 11  (KV written for p0..g0; g1 is the next step's input)
    num_pending_tokens = 1    ([?]: sampled by a step still running on the device; its value reaches
                               the host after the next step was launched, see engine.py)

A sequence is in prefill while more than one of its tokens lacks KV, in decode afterwards (exactly one
token, the last sampled one, lacks KV). A step that computes a sequence's last uncomputed token samples
its next token. Preemption by recomputation resets it to zero computed tokens; its generated tokens
stay and are prefilled again with the prompt. Where its KV lives is the KV manager's business
(kv_manager.py), not the sequence's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from terse.backend.types import SamplingParams

PENDING_TOKEN = -1
"""Placeholder id of a token sampled on the device whose value has not reached the host yet."""


class Draft(NamedTuple):
    """Tokens proposed to follow a sequence's next input token, verified in one forward pass (speculative.py)."""

    tokens: tuple[int, ...]
    """The proposed tokens, in order (at least one)."""
    guess: int | None = None
    """The value the draft assumes for the next input token while that token is still on the device
    (sampled by the step in flight); None when the host knows it."""
    assumed_accepted: int = 0
    """Draft tokens of the step in flight that this draft assumes accepted (its tokens follow those)."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """Queued; holds no KV blocks."""
    RUNNING = "running"
    """Admitted; holds blocks for its computed tokens."""
    FINISHED = "finished"
    """Done (stopped, length, cancelled or failed); its blocks are released."""


@dataclass(eq=False)
class Sequence:
    """One request's mutable state. Only the engine loop thread touches it after submission."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int
    """Hard cap on len(token_ids) (the engine's max_model_len)."""
    num_logprob_start: int | None = None
    """Scoring requests: the first position whose next-token log-probability is wanted; None when the
    request generates instead. Such positions are never taken from the prefix cache."""
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache at the latest admission."""
    num_pending_tokens: int = 0
    """Trailing entries of `token_ids` that are `PENDING_TOKEN` placeholders (at most two: one sampled
    by the step in flight, one by the step launched after it). A step that verified a draft resolves its
    placeholder into the accepted tokens plus one."""
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    prompt_logprobs: list[float] = field(default_factory=list)
    """Scoring requests: log P(token_ids[p + 1] | token_ids[:p + 1]) for p from num_logprob_start on."""
    generator: Any = None
    """The request's seeded torch.Generator (None: unseeded); opaque to the scheduler."""
    constraint: Any = None
    """Structured output: the request's grammar `ConstraintState` (None: unconstrained); opaque to the
    scheduler. Only the runner's late sampling and the engine's token hook use it (see local/grammar.py):
    a constrained sequence is scheduled like any other, its token still pending on the device."""
    draft: Draft | None = None
    """Speculative decoding: tokens to verify after the next input in the next step (set by the speculator
    before scheduling; the scheduler may shorten or drop it). None decodes one token."""
    num_speculative_tokens: int = 0
    """Draft tokens of the step in flight that may still be accepted: the next step's positions lie up to
    this much beyond what `num_computed_tokens` says (the runner shifts them on the device)."""
    num_draft_tokens: int = 0
    """Draft tokens verified for this request."""
    num_accepted_tokens: int = 0
    """Of those, accepted."""
    spec: Any = None
    """The speculator's per-sequence state (None: this sequence never drafts); the scheduler reads only its
    `drafting` flag (held drafting)."""

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, pending ones included."""
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) : len(self.token_ids) - self.num_pending_tokens]

    @property
    def is_prefilling(self) -> bool:
        """True while more than one token lacks KV (a decode step computes exactly one)."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_scoring(self) -> bool:
        return self.num_logprob_start is not None

    @property
    def samples(self) -> bool:
        """Whether completing its tokens samples a next one (not for scoring or prefill-only requests)."""
        return self.num_logprob_start is None and self.params.max_tokens > 0

    @property
    def reached_length_limit(self) -> bool:
        """No further token may be generated (pending ones counted): max_tokens or max_len is reached."""
        return self.num_output_tokens >= self.params.max_tokens or self.num_tokens >= self.max_len

    @property
    def max_cacheable_prefix_len(self) -> int:
        """Longest prefix that may come from the cache: at least one token is always computed (its
        logits give the next token), and scoring requests compute every position they score."""
        limit = self.num_tokens - 1
        if self.num_logprob_start is not None:
            limit = min(limit, self.num_logprob_start)
        return max(limit, 0)

    def append_pending(self) -> None:
        """A step that samples this sequence's next token was launched: hold its place."""
        self.token_ids.append(PENDING_TOKEN)
        self.num_pending_tokens += 1

    def resolve_pending(self, token_id: int) -> None:
        """The oldest pending token's value arrived from the device."""
        assert self.num_pending_tokens > 0, "no pending token to resolve"
        self.token_ids[len(self.token_ids) - self.num_pending_tokens] = token_id
        self.num_pending_tokens -= 1

    def insert_resolved(self, token_id: int) -> None:
        """One more token of the step just resolved (a verified draft yields several): it goes before the
        placeholders of later steps."""
        self.token_ids.insert(len(self.token_ids) - self.num_pending_tokens, token_id)

    def drop_pending(self) -> None:
        """Forget tokens still pending (the request ended before they were needed). KV computed past the
        tokens kept (an accepted draft beyond a stop) no longer counts."""
        if self.num_pending_tokens:
            del self.token_ids[len(self.token_ids) - self.num_pending_tokens :]
            self.num_pending_tokens = 0
        self.num_computed_tokens = min(self.num_computed_tokens, len(self.token_ids))

    def reset_for_recompute(self) -> None:
        """Forget all KV (the KV manager has released the blocks): the sequence will prefill again."""
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.prompt_logprobs = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
