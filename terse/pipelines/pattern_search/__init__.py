"""Offline search of per-head sparse prefill patterns (`terse sparse-patterns`).

A one-off job, run before serving: capture a model's post-rotary q/k on a sample prompt, try each
candidate pattern of `terse.kernels.patterns` on every head with the kernels' own online estimators, and
keep the cheapest one that holds the target attention mass. Its output is the patterns JSON the local
engine reads through `terse.kernels.patterns.load_or_default`; the kernels never import it.

| module | holds |
|---|---|
| `search` | `search_layer`, `search_model_patterns`, `SearchConfig`: recall vs computed tiles per head |
| `capture` | `search_transformers_model`: the search on a transformers model (q/k captured per layer) |
"""

from __future__ import annotations

from terse.pipelines.pattern_search.capture import capture_layer_qk, search_transformers_model
from terse.pipelines.pattern_search.search import HeadScore, SearchConfig, search_layer, search_model_patterns

__all__ = [
    "HeadScore",
    "SearchConfig",
    "capture_layer_qk",
    "search_layer",
    "search_model_patterns",
    "search_transformers_model",
]
