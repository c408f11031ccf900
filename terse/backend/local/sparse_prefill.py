"""Sparse prefill in the engine: long uncached prompt chunks attend through `terse.kernels`' per-head
patterns; everything else stays on the dense paths.

What changes and what does not:

    step:  write K/V of the step's tokens into the pool          (unchanged: same slots, same values)
           dense spans  -> solo causal kernel / padded groups     (unchanged)
           sparse spans -> gather cached + new K/V through the block table, then
                           sparse_prefill_attention(q = new tokens, k/v = cached + new)

A span is sparse when its new tokens (q_len: the part the prefix cache did not cover) reach the
threshold, `choose_prefill_path(q_len, ...)` of the kernels (32K tokens by default, the measured
crossover on the H200). The kernels take q_len < k_len (queries are the last q_len of k_len keys), so a
prefix-cache hit or an earlier chunk is attended in full geometry, sparsely. Only the attention output
of sparse spans differs from dense prefill; the KV the step writes for layer 0 is bit-identical, deeper
layers' KV follow from the (approximate) hidden states as they would with any attention change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from terse.errors import ConfigError

if TYPE_CHECKING:
    from terse.backend.local.attention import AttentionMetadata
    from terse.kernels.patterns import ModelPatterns
    from terse.kernels.prefill import SparsePrefillConfig

DEFAULT_MIN_SPARSE_Q_LEN = 32768
"""Same default as `terse.kernels.prefill.SparsePrefillConfig.min_sparse_q_len` (checked in tests)."""


@dataclass(frozen=True)
class SparsePrefillSettings:
    """Sparse prefill of the local engine. Frozen; a bad value raises `ConfigError` naming the fix."""

    enabled: bool = False
    """Run long uncached prompt chunks through the sparse kernels (False: every prefill is dense)."""
    patterns_path: str | None = None
    """Per-head patterns JSON from `terse sparse-patterns`; None (or a missing file) takes the kernels'
    default patterns (vertical-slash on every head)."""
    min_sparse_q_len: int = DEFAULT_MIN_SPARSE_Q_LEN
    """Uncached tokens of a chunk from which it prefills sparsely; shorter chunks stay dense."""
    backend: Literal["auto", "triton", "torch"] = "auto"
    """Kernel backend: auto = Triton on CUDA for the head dims it is built for, torch otherwise."""

    def __post_init__(self) -> None:
        if not isinstance(self.min_sparse_q_len, int) or self.min_sparse_q_len < 1:
            raise ConfigError(
                f"sparse_prefill.min_sparse_q_len={self.min_sparse_q_len!r} must be an int >= 1 "
                f"(default {DEFAULT_MIN_SPARSE_Q_LEN})"
            )
        if self.backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"sparse_prefill.backend={self.backend!r}; use 'auto', 'triton' or 'torch'")


class SparsePrefill:
    """The sparse part of a step's prefill attention, for one model. Built once per engine."""

    def __init__(self, patterns: ModelPatterns, config: SparsePrefillConfig) -> None:
        self.patterns = patterns
        self.config = config
        self.num_sparse_spans = 0
        """Spans prefilled sparsely so far (counted at layer 0)."""

    def is_sparse(self, q_len: int) -> bool:
        from terse.kernels.prefill import choose_prefill_path

        return choose_prefill_path(q_len, self.config) == "sparse"

    def __call__(
        self, q: torch.Tensor, layer_kv: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor, layer_index: int
    ) -> None:
        """q: [T, H, D]; layer_kv: [2, NB, bs, KVH, D] holding this step's K/V. Writes the rows of the
        sparse spans into `out` ([T, H, D])."""
        from terse.kernels.prefill import sparse_prefill_attention

        spans = [s for s in meta.prefills if s.sparse]
        if not spans:
            return
        if layer_index == 0:
            self.num_sparse_spans += len(spans)
        q_rows = torch.cat([q[s.q_start : s.q_start + s.q_len] for s in spans])  # [total_q, H, D]
        keys, values = [], []
        for s in spans:
            table = torch.tensor(s.block_table, dtype=torch.int64, device=q.device)
            kv = layer_kv[:, table].flatten(1, 2)[:, : s.context_len]  # [2, context_len, KVH, D]
            keys.append(kv[0])
            values.append(kv[1])
        cu_q = _cumulative([s.q_len for s in spans], q.device)
        cu_k = _cumulative([s.context_len for s in spans], q.device)
        attended = sparse_prefill_attention(
            q_rows, torch.cat(keys), torch.cat(values), cu_q, cu_k,
            max(s.q_len for s in spans), max(s.context_len for s in spans),
            self.patterns.layer(layer_index), q.shape[-1] ** -0.5, config=self.config,
        )  # [total_q, H, D]
        row = 0
        for s in spans:
            out[s.q_start : s.q_start + s.q_len] = attended[row : row + s.q_len]
            row += s.q_len


def _cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    """[len(lengths) + 1] int32 offsets."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def build_sparse_prefill(
    settings: SparsePrefillSettings, model_name: str, num_layers: int, num_q_heads: int
) -> SparsePrefill | None:
    """The engine's sparse prefill, or None when `settings.enabled` is False. A patterns file made for
    another model shape raises `ConfigError`."""
    if not settings.enabled:
        return None
    from terse.kernels.patterns import load_or_default
    from terse.kernels.prefill import SparsePrefillConfig

    patterns = load_or_default(settings.patterns_path, model_name, num_layers, num_q_heads)
    config = SparsePrefillConfig(min_sparse_q_len=settings.min_sparse_q_len, backend=settings.backend)
    return SparsePrefill(patterns, config)
