"""Reciprocal rank fusion (Cormack, Clarke and Buettcher, 2009).

    fused(d) = sum over rankings r containing d of 1 / (rrf_k + rank_r(d)),   rank 1-based

RRF uses ranks only, so dense inner products and BM25 scores, which live on unrelated scales, need no
calibration against each other. The constant (60 by default) damps the lead of top ranks: with k=60,
rank 1 scores 1/61 and rank 10 scores 1/70, so agreement between rankings outweighs one high rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Fused(NamedTuple):
    """One fused result: id, fused score, and its 1-based rank in each input ranking (None if absent)."""

    item_id: int
    score: float
    ranks: tuple[int | None, ...]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], rrf_k: int = 60) -> list[Fused]:
    """Fuse rankings of ids (best first) into one, best first; ties break by smaller id.

    An id repeated within one ranking counts once, at its best rank.
    """
    ranks: dict[int, list[int | None]] = {}
    for which, ranking in enumerate(rankings):
        for position, item_id in enumerate(ranking, start=1):
            slot = ranks.setdefault(int(item_id), [None] * len(rankings))
            if slot[which] is None:
                slot[which] = position
    fused = [
        Fused(item_id, sum(1.0 / (rrf_k + r) for r in item_ranks if r is not None), tuple(item_ranks))
        for item_id, item_ranks in ranks.items()
    ]
    fused.sort(key=lambda f: (-f.score, f.item_id))
    return fused
