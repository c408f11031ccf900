"""Sparse prefill in the engine: long uncached prompt chunks attend through `terse.kernels`' per-head
patterns; everything else stays on the dense paths.

What changes and what does not:

    step:  write K/V of the step's tokens into the pool          (unchanged: same slots, same values)
           dense spans  -> solo causal kernel / padded groups     (unchanged)
           sparse spans -> gather cached + new K/V through the block table, then
                           sparse_prefill(q = new tokens, k/v = cached + new)

The step's plan (`SparsePrefill.plan`, once per step) holds the flat query rows of the sparse spans,
the pool slots of their keys (cached + new) and the varlen offsets; each layer then only gathers its
K/V through those slots and runs the kernels (`SparsePrefill.run`).

A span is sparse when its new tokens (q_len: the part the prefix cache did not cover) reach the
threshold, `choose_prefill_path(q_len, ...)` of the kernels (32K tokens by default, the measured
crossover on the H200). The kernels take q_len < k_len (queries are the last q_len of k_len keys), so a
prefix-cache hit or an earlier chunk is attended in full geometry, sparsely. Only the attention output
of sparse spans differs from dense prefill; the KV the step writes for layer 0 is bit-identical, deeper
layers' KV follow from the (approximate) hidden states as they would with any attention change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from terse.backend.local.config import SparsePrefillSettings
from terse.backend.local.staging import to_device

if TYPE_CHECKING:
    from terse.backend.local.attention import PrefillSpan
    from terse.kernels.patterns import ModelPatterns
    from terse.kernels.prefill_config import SparsePrefillConfig
    from terse.kernels.varlen import VarlenLayout


@dataclass
class SparsePlan:
    """The sparse spans of one step, as index tensors and one varlen layout (built once, read by every
    layer)."""

    q_rows: torch.Tensor
    """[total_q] int64: flat rows of the spans' queries, span by span."""
    kv_slots: torch.Tensor
    """[total_k] int64: pool slots of each span's context keys (cached + new), span by span."""
    layout: VarlenLayout
    """Where each span's queries and keys sit in the gathered rows (offsets known on the host too)."""


class SparsePrefill:
    """The sparse part of a step's prefill attention, for one model. Built once per engine."""

    def __init__(self, patterns: ModelPatterns, config: SparsePrefillConfig) -> None:
        self.patterns = patterns
        self.config = config
        self.num_sparse_spans = 0
        """Spans prefilled sparsely so far."""

    def is_sparse(self, q_len: int) -> bool:
        from terse.kernels.prefill import choose_prefill_path

        return choose_prefill_path(q_len, self.config) == "sparse"

    def plan(self, spans: list[PrefillSpan], block_size: int, device: torch.device) -> SparsePlan:
        """Index tensors of the step's sparse spans (each span's block table covers its context)."""
        from terse.kernels.varlen import VarlenLayout

        self.num_sparse_spans += len(spans)
        q_rows = np.concatenate([np.arange(s.q_start, s.q_start + s.q_len) for s in spans])
        slots = np.concatenate([_slots(s.block_table, s.context_len, block_size) for s in spans])
        layout = VarlenLayout.from_lengths([s.q_len for s in spans], [s.context_len for s in spans], device)
        return SparsePlan(to_device(q_rows, torch.int64, device), to_device(slots, torch.int64, device), layout)

    def run(self, q: torch.Tensor, layer_kv: torch.Tensor, plan: SparsePlan, out: torch.Tensor, layer_index: int) -> None:
        """q: [T, H, D]; layer_kv: [2, NB, bs, KVH, D] holding this step's K/V. Writes the rows of the
        sparse spans into `out` ([T, H, D])."""
        from terse.kernels.prefill import sparse_prefill
        from terse.kernels.varlen import VarlenBatch

        flat = layer_kv.view(2, -1, *layer_kv.shape[-2:])  # [2, NB * bs, KVH, D]
        kv = flat.index_select(1, plan.kv_slots)  # [2, total_k, KVH, D]
        batch = VarlenBatch(q.index_select(0, plan.q_rows), kv[0], kv[1], plan.layout)
        attended = sparse_prefill(batch, self.patterns.layer(layer_index), q.shape[-1] ** -0.5, config=self.config)
        out.index_copy_(0, plan.q_rows, attended)  # attended: [total_q, H, D]


def _slots(block_table: list[int], num_tokens: int, block_size: int) -> np.ndarray:
    """Pool slots of positions [0, num_tokens) through a block table."""
    c = np.arange(num_tokens)
    return np.asarray(block_table, dtype=np.int64)[c // block_size] * block_size + c % block_size


def build_sparse_prefill(
    settings: SparsePrefillSettings, model_name: str, num_layers: int, num_q_heads: int
) -> SparsePrefill | None:
    """The engine's sparse prefill, or None when `settings.enabled` is False. A patterns file made for
    another model shape raises `ConfigError`."""
    if not settings.enabled:
        return None
    from terse.kernels.patterns import load_or_default

    patterns = load_or_default(settings.patterns_path, model_name, num_layers, num_q_heads)
    return SparsePrefill(patterns, settings.kernel)
