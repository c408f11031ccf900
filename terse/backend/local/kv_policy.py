"""Per-sequence KV policies: how many blocks a sequence needs and which it may give back.

The dense policy keeps every token's KV for the life of the sequence. Other policies (a sink + recent
window, for instance) register here and are picked per request from `SamplingParams.streaming_kv` or
`EngineConfig.default_streaming_kv`; the scheduler only ever talks to the `KVPolicy` interface.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from terse.backend.local.sequence import Sequence
from terse.backend.types import StreamingKV
from terse.errors import InvalidRequestError


class KVPolicy(Protocol):
    """Decides the block footprint of one sequence. Pure: reads the sequence, mutates nothing."""

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int, block_size: int) -> int:
        """Blocks to add to `seq.block_table` before computing `num_new_tokens` more tokens."""
        ...

    def max_blocks(self, seq: Sequence, block_size: int) -> int:
        """Most blocks the sequence can ever hold (to reject one that cannot fit in the pool alone)."""
        ...

    def num_sink_blocks(self, block_size: int) -> int:
        """Leading blocks kept for the whole life of the sequence when others are released."""
        ...

    def num_releasable_blocks(self, seq: Sequence, num_new_tokens: int, block_size: int) -> int:
        """Blocks after the sinks the next `num_new_tokens` no longer attend to (0: keep everything)."""
        ...


class DenseKVPolicy:
    """Every computed token keeps its KV: blocks = ceil(tokens / block_size)."""

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int, block_size: int) -> int:
        total_len = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total_len // block_size) - len(seq.block_table))

    def max_blocks(self, seq: Sequence, block_size: int) -> int:
        max_tokens = min(seq.max_len, seq.num_prompt_tokens + seq.params.max_tokens)
        return -(-max_tokens // block_size)

    def num_sink_blocks(self, block_size: int) -> int:
        return 0

    def num_releasable_blocks(self, seq: Sequence, num_new_tokens: int, block_size: int) -> int:
        return 0


DENSE = DenseKVPolicy()

# StreamingKV settings -> policy; terse.backend.local.streaming registers "sink_window" on import.
STREAMING_POLICIES: dict[str, Callable[[StreamingKV], KVPolicy]] = {}


def policy_for(streaming_kv: StreamingKV | None) -> KVPolicy:
    """The policy for one request: dense when `streaming_kv` is None."""
    if streaming_kv is None:
        return DENSE
    import terse.backend.local.streaming  # noqa: F401  (registers the sink + window policy)

    factory = STREAMING_POLICIES.get("sink_window")
    if factory is None:
        raise InvalidRequestError(
            f"streaming_kv={streaming_kv} is not supported by this engine build (no streaming KV policy "
            f"is registered); leave streaming_kv=None to use the dense cache"
        )
    return factory(streaming_kv)
