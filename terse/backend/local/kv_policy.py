"""Per-sequence KV policies: how a sequence's blocks grow, which it may give back, how they are laid out.

`SeqKV` is one sequence's KV layout (its block table and, for policies that drop KV, how many leading
positions no longer have any). The KV manager owns every `SeqKV` and applies its sequence's policy to
it; the runner only reads `block_ids` and `num_dropped_tokens`. The dense policy keeps every token's
KV for the life of the sequence; the streaming policy (streaming.py) keeps sinks + a recent window.
`policy_for` picks one per request from `SamplingParams.streaming_kv` (or the engine default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from terse.backend.local.sequence import Sequence
from terse.backend.types import StreamingKV

if TYPE_CHECKING:
    from terse.backend.local.prefix_cache import RadixNode


class KVCopy(NamedTuple):
    """Copy whole blocks in every layer before a step: V as is, K re-rotated by `rope_shift` positions
    (0: a plain copy). The destination blocks belong to one sequence alone."""

    src_block_ids: list[int]
    dst_block_ids: list[int]
    rope_shift: int


@dataclass(eq=False)
class SeqKV:
    """Where one sequence's KV lives; mutated only by the KV manager and the sequence's policy.

    The KV of position p sits at index c = p - num_dropped_tokens of the table:
    slot(p) = block_ids[c // block_size] * block_size + c % block_size.
    """

    policy: KVPolicy
    block_ids: list[int] = field(default_factory=list)
    num_dropped_tokens: int = 0
    """Positions whose KV the policy released (whole blocks after the sinks; 0 under the dense policy)."""
    side_block_ids: list[int] = field(default_factory=list)
    """Blocks the sequence holds that its table does not list (streaming: the original sink blocks
    while the table starts with re-rotated private copies)."""
    rope_shift: int = 0
    """Streaming: the shift the private sink copies were last rotated by."""
    locked: RadixNode | None = None
    """The deepest prefix-cache node this sequence pins (the manager's; None when it pins none)."""

    def kv_len(self, num_tokens: int) -> int:
        """Table entries covering positions [0, num_tokens)."""
        return num_tokens - self.num_dropped_tokens


class KVPolicy(Protocol):
    """One sequence's block footprint. Methods mutate only the `SeqKV` they are given."""

    def max_blocks(self, seq: Sequence, block_size: int) -> int:
        """Most blocks the sequence can ever hold (to reject one that cannot fit in the pool alone)."""
        ...

    def release(self, kv: SeqKV, first_query: int, block_size: int) -> list[int]:
        """Remove from `kv.block_ids` the blocks that queries from position `first_query` on no longer
        see and advance `kv.num_dropped_tokens`. Returns the removed block ids (the caller drops the
        sequence's references on them)."""
        ...

    def num_blocks_needed(self, kv: SeqKV, end: int, block_size: int) -> int:
        """Blocks to add (after `release`) so that positions below `end` have KV slots."""
        ...

    def place(self, kv: SeqKV, new_block_ids: list[int], block_size: int) -> KVCopy | None:
        """Add freshly allocated blocks to the layout; returns a copy the step needs first, if any."""
        ...

    def truncate(self, kv: SeqKV, end: int, block_size: int) -> list[int]:
        """Remove the trailing blocks no position below `end` maps to (speculative rollback: blocks taken
        for rejected draft positions). Returns the removed block ids (the caller drops its references)."""
        ...

    def max_span(self, kv: SeqKV, first_query: int, block_size: int) -> int:
        """How many consecutive query positions from `first_query` on see exactly the KV this policy keeps
        for a query at `first_query` (a speculative step must not verify past it: queries beyond would see
        KV a one-token step would already have released)."""
        ...


class DenseKVPolicy:
    """Every computed token keeps its KV: blocks = ceil(tokens / block_size)."""

    def __repr__(self) -> str:
        return "DenseKVPolicy()"

    def max_blocks(self, seq: Sequence, block_size: int) -> int:
        max_tokens = min(seq.max_len, seq.num_prompt_tokens + seq.params.max_tokens)
        return -(-max_tokens // block_size)

    def release(self, kv: SeqKV, first_query: int, block_size: int) -> list[int]:
        return []

    def num_blocks_needed(self, kv: SeqKV, end: int, block_size: int) -> int:
        return max(0, -(-end // block_size) - len(kv.block_ids))

    def place(self, kv: SeqKV, new_block_ids: list[int], block_size: int) -> KVCopy | None:
        kv.block_ids += new_block_ids
        return None

    def truncate(self, kv: SeqKV, end: int, block_size: int) -> list[int]:
        return truncate_table(kv, -(-end // block_size))

    def max_span(self, kv: SeqKV, first_query: int, block_size: int) -> int:
        return UNBOUNDED_SPAN


UNBOUNDED_SPAN = 1 << 62
"""`max_span` of a policy that never releases KV."""


def truncate_table(kv: SeqKV, num_blocks: int) -> list[int]:
    """Cut `kv.block_ids` to its first `num_blocks` entries; returns the removed ids."""
    removed = kv.block_ids[num_blocks:]
    del kv.block_ids[num_blocks:]
    return removed


DENSE = DenseKVPolicy()


def policy_for(streaming_kv: StreamingKV | None) -> KVPolicy:
    """The policy of one request: dense when `streaming_kv` is None, else sinks + window."""
    if streaming_kv is None:
        return DENSE
    from terse.backend.local.streaming import StreamingKVPolicy

    return StreamingKVPolicy(streaming_kv.sink_tokens, streaming_kv.window_tokens)
