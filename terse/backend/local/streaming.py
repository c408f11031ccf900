"""Streaming KV cache: attention sinks + a recent window, released block by block (StreamingLLM).

A sequence under `StreamingKVPolicy(sink_tokens, window_tokens)` keeps the KV of its first
`num_sink_blocks = ceil(sink_tokens / bs)` blocks (the sinks, rounded up to whole blocks) and of the
blocks holding its most recent `window_tokens` tokens. Whole blocks between the two are released to the
allocator before a step whose first query no longer sees them:

    logical blocks (bs = 4, sinks = 4, window = 8), first query of the step at position 21:

      positions:  0..3 | 4..7 | 8..11 | 12..15 | 16..19 | 20..23
      blocks:     [S0] | [b1] | [b2]  | [b3]   | [b4]   | [b5]
                  sink   released       window (covers 14..21 >= 8 tokens)
      block_table = [S0', b3, b4, b5]   num_dropped_tokens = 8 (blocks b1, b2)

    compacted position of a kept token = position - num_dropped_tokens (0..3 for sinks, 4.. after)

A block b after the sinks is released once all its tokens precede the window of the step's first query
p0: (b + 1) * bs <= p0 + 1 - window_tokens. Nothing is released while the sequence has fewer than
num_sink_blocks * bs + window_tokens + bs tokens, so below sinks + window the output equals the dense
cache's. Blocks held while decoding never exceed

    2 * ceil(sink_tokens / bs) + ceil(window_tokens / bs) + 1

(sink originals + their rotated copies, see below; the window's oldest block may be partly stale and the
newest partly filled). A prefill chunk of q tokens temporarily adds ceil(q / bs) blocks.

Positions (why no cached key is ever rotated twice). StreamingLLM assigns RoPE positions by place in the
cache: sinks at 0..s-1, the window right after. RoPE scores depend only on q_pos - k_pos, so any frame
shifted by a constant gives the same attention. This engine uses the frame in which window keys never
move: queries and fresh keys are rotated at their original text position p (exactly as in the dense
cache), and the sinks are moved instead, to sit right before the window:

    cache frame (StreamingLLM):   sinks 0..s-1 | window s..s+w-1 | query s+w
    engine frame (+ d):           sinks d..d+s-1 | window d+s.. (original positions) | query p

where d = num_dropped_tokens. Each time d grows, the sinks' keys are rewritten as R(d) applied to the
*original* sink keys (rotated at 0..s-1 when they were computed), in float32 with the angle d * inv_freq
computed in float64, then cast once to the cache dtype: one rounding, however long the sequence runs.
The originals stay untouched in their own blocks (they are usually shared with the prefix cache or
other requests); the rotated copies live in blocks this sequence owns alone and replace the originals
in its block table; the policy hands the manager a `KVCopy` (originals -> copies, shift d) that the
runner applies before the step. Window keys are written once, never shifted; only sink keys are rewritten.

Prefix cache: a shared prompt prefix stays shared until the first release. At that moment the KV
manager unlocks the sequence's radix-tree path (so the tree may evict those blocks once nobody uses them) and stops
publishing blocks to it (its block table no longer maps positions to block indices one to one). A
release drops this sequence's reference only: a block another request or the tree holds stays intact.

Preemption (recompute): the sequence's blocks (window, sink copies, sink originals) are released and it
prefills prompt + generated tokens again from position 0, chunk by chunk, releasing blocks between
chunks by the same rule. The recomputed cache has the same layout (sinks + the window of the next
query), but the window's KV is recomputed with each chunk seeing sinks + window + the chunk, not token
by token, so it is not bit-identical to the cache that was evicted.
"""

from __future__ import annotations

from terse.backend.local.kv_policy import KVCopy, SeqKV, truncate_table
from terse.backend.local.sequence import Sequence


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class StreamingKVPolicy:
    """Sinks (rounded up to whole blocks) + a recent window of at least `window_tokens` tokens.

    A `KVPolicy`: the KV manager calls `release` before each allocation, then `num_blocks_needed`,
    then `place` with the fresh blocks.
    """

    def __init__(self, sink_tokens: int, window_tokens: int) -> None:
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens

    def __repr__(self) -> str:
        return f"StreamingKVPolicy(sink_tokens={self.sink_tokens}, window_tokens={self.window_tokens})"

    def num_sink_blocks(self, block_size: int) -> int:
        """Blocks kept from the start of the sequence for its whole life."""
        return _ceil_div(self.sink_tokens, block_size)

    def num_releasable_blocks(self, kv: SeqKV, first_query: int, block_size: int) -> int:
        """Blocks after the sinks (and after those already released) that a query at position
        `first_query` no longer sees."""
        oldest_visible = first_query + 1 - self.window_tokens  # first position of the query's window
        if oldest_visible <= 0:
            return 0
        first_kept = self.num_sink_blocks(block_size) + kv.num_dropped_tokens // block_size
        return max(0, oldest_visible // block_size - first_kept)

    def release(self, kv: SeqKV, first_query: int, block_size: int) -> list[int]:
        num_release = self.num_releasable_blocks(kv, first_query, block_size)
        if num_release == 0:
            return []
        num_sink = self.num_sink_blocks(block_size)
        released = kv.block_ids[num_sink : num_sink + num_release]
        del kv.block_ids[num_sink : num_sink + num_release]
        kv.num_dropped_tokens += num_release * block_size
        return released

    def num_blocks_needed(self, kv: SeqKV, end: int, block_size: int) -> int:
        """The window's new blocks, plus private copies of the sink blocks at the first release."""
        needed = max(0, _ceil_div(kv.kv_len(end), block_size) - len(kv.block_ids))
        if kv.num_dropped_tokens and not kv.side_block_ids:
            needed += self.num_sink_blocks(block_size)
        return needed

    def place(self, kv: SeqKV, new_block_ids: list[int], block_size: int) -> KVCopy | None:
        """At the first release the first `num_sink_blocks` new blocks become the private sink copies
        (the originals move to `kv.side_block_ids`); the rest extend the window. Returns the sink
        rewrite when the sinks must move (num_dropped_tokens grew since their last rewrite)."""
        num_sink = self.num_sink_blocks(block_size)
        if kv.num_dropped_tokens and num_sink and not kv.side_block_ids:
            kv.side_block_ids = kv.block_ids[:num_sink]
            kv.block_ids[:num_sink] = new_block_ids[:num_sink]
            new_block_ids = new_block_ids[num_sink:]
        kv.block_ids += new_block_ids
        if not num_sink or kv.num_dropped_tokens == kv.rope_shift:
            return None
        kv.rope_shift = kv.num_dropped_tokens
        return KVCopy(list(kv.side_block_ids), kv.block_ids[:num_sink], kv.rope_shift)

    def truncate(self, kv: SeqKV, end: int, block_size: int) -> list[int]:
        """Speculative rollback: the window's trailing blocks past `end` (never the sinks)."""
        keep = max(_ceil_div(kv.kv_len(end), block_size), self.num_sink_blocks(block_size))
        return truncate_table(kv, keep)

    def max_span(self, kv: SeqKV, first_query: int, block_size: int) -> int:
        """Queries from `first_query` until the next block would be released. The releasable count at q is
        max(0, f(q) - first_kept), f(q) = floor((q + 1 - window) / bs): it first exceeds the count at
        `first_query` at q = (max(f(first_query), first_kept) + 1) * bs + window - 1."""
        first_kept = self.num_sink_blocks(block_size) + kv.num_dropped_tokens // block_size
        level = max((first_query + 1 - self.window_tokens) // block_size, first_kept)
        return (level + 1) * block_size + self.window_tokens - 1 - first_query

    def max_blocks(self, seq: Sequence, block_size: int) -> int:
        """The decode bound plus the longest first prefill chunk (the prompt), capped by the dense need."""
        max_tokens = min(seq.max_len, seq.num_prompt_tokens + seq.params.max_tokens)
        dense = _ceil_div(max_tokens, block_size)
        bound = self.max_decode_blocks(block_size) + _ceil_div(seq.num_prompt_tokens, block_size)
        return min(dense, bound)

    def max_decode_blocks(self, block_size: int) -> int:
        """Most blocks a decoding sequence holds: 2 * ceil(s / bs) + ceil(w / bs) + 1."""
        return 2 * self.num_sink_blocks(block_size) + _ceil_div(self.window_tokens, block_size) + 1
