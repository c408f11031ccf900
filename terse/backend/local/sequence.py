"""Per-request state of the local engine: token ids, KV block table and progress counters.

Index arithmetic of one sequence (block size 4, 10 prompt tokens, 2 generated):

    token_ids:  p0 p1 p2 p3 | p4 p5 p6 p7 | p8 p9 g0 g1
    blocks:     [ block 7  ] [ block 2   ] [ block 9    ]      block_table = [7, 2, 9]
    num_cached_tokens = 8     (p0..p7 came from the prefix cache: blocks 7 and 2 are shared)
    num_computed_tokens = 11  (KV written for p0..g0; g1 was just sampled and has no KV yet)

A sequence is in prefill while more than one of its tokens lacks KV, in decode afterwards (exactly one
token, the last sampled one, lacks KV). A step that computes a sequence's last uncomputed token samples
its next token. Preemption by recomputation resets it to zero computed
tokens and an empty block table; its generated tokens stay and are prefilled again with the prompt.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from terse.backend.types import SamplingParams


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
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache at the latest admission."""
    num_preemptions: int = 0
    num_dropped_tokens: int = 0
    """Tokens whose KV a streaming policy released (whole blocks after the sinks): a kept token at
    position p sits at index p - num_dropped_tokens of the block table's KV (see streaming.py)."""
    sink_source_blocks: list[int] = field(default_factory=list)
    """Streaming only: the original sink blocks, held while `block_table` starts with rotated copies."""
    status: SequenceStatus = SequenceStatus.WAITING
    prompt_logprobs: list[float] = field(default_factory=list)
    """Scoring requests: log P(token_ids[p + 1] | token_ids[:p + 1]) for p from num_logprob_start on."""
    generator: Any = None
    """The request's seeded torch.Generator (None: unseeded); opaque to the scheduler."""
    constraint: Any = None
    """Structured output: the request's grammar `ConstraintState` (None: unconstrained); opaque to the
    scheduler. Only the runner's mask hook and the engine's token hook use it (see local/grammar.py)."""

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
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_kv_tokens(self) -> int:
        """Computed tokens whose KV the sequence still holds (all of them under the dense cache)."""
        return self.num_computed_tokens - self.num_dropped_tokens

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
    def max_cacheable_prefix_len(self) -> int:
        """Longest prefix that may come from the cache: at least one token is always computed (its
        logits give the next token), and scoring requests compute every position they score."""
        limit = self.num_tokens - 1
        if self.num_logprob_start is not None:
            limit = min(limit, self.num_logprob_start)
        return max(limit, 0)

    def reset_for_recompute(self) -> None:
        """Forget all KV (the caller has released the blocks): the sequence will prefill again."""
        self.block_table = []
        self.sink_source_blocks = []
        self.num_dropped_tokens = 0
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.prompt_logprobs = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
