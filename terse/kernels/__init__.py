"""terse.kernels: dynamic sparse prefill attention (Triton kernels beside their torch references).

Importing the package loads nothing heavy: names resolve lazily, and triton is imported only by the
kernel modules (`block_sparse`, `a_shape`, `tiles`), which the entry point loads when it runs them.

| module | holds |
|---|---|
| `varlen` | `VarlenLayout` (where each sequence's rows are, validated once) and `VarlenBatch` (q, k, v in it) |
| `prefill` | `sparse_prefill` (the engine's entry point), `choose_prefill_path` |
| `prefill_config` | `SparsePrefillConfig`, `EstimateConfig` (no torch import) |
| `patterns` | per-head pattern dataclasses, JSON load/save/validate, `default_patterns` |
| `estimate`, `estimate_blocks` | online vertical-slash and block-sparse index estimation |
| `block_sparse`, `vertical_slash`, `a_shape` | the Triton kernels and launchers; vertical-slash index conversion |
| `reference` | float32 dense attention under each index format's mask |
"""

from __future__ import annotations

from terse.lazy import lazy_exports, lazy_names

_LAZY = {  # module -> the names it defines
    "terse.kernels.varlen": ("VarlenLayout", "VarlenBatch"),
    "terse.kernels.prefill": ("sparse_prefill", "sparse_prefill_attention", "choose_prefill_path"),
    "terse.kernels.prefill_config": ("SparsePrefillConfig", "EstimateConfig"),
    "terse.kernels.patterns": (
        "ModelPatterns", "load_patterns", "save_patterns", "load_or_default", "default_patterns",
    ),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
__all__ = lazy_names(_LAZY)
