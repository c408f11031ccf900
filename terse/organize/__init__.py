"""terse.organize: output parallelization. Skeleton-of-Thought (`SkeletonOfThought`) expands a short
skeleton's points in one batch; DAG decomposition (`DagDecomposition`, needs networkx) answers planned
sub-questions in waves. The shared prompt formats live in `terse.organize.formats` (no dependencies
beyond the backend types, so training-data code can import them alone); routing in `terse.organize.router`.

The names below load on first use, so importing `terse.organize.formats` stays light.
"""

from __future__ import annotations

from terse.lazy import lazy_exports, lazy_names

_LAZY = {  # module -> the names it defines
    "terse.organize.dag": ("DagConfig", "DagResult", "DagDecomposition"),
    "terse.organize.skeleton": ("PointAnswer", "SkeletonOfThought", "SoTConfig", "SoTResult"),
    "terse.organize.router": ("Route", "Router", "RuleRouter"),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
__all__ = lazy_names(_LAZY)
