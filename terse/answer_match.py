"""Exact-match scoring of model answers against gold answers (doc-QA jobs, benchmarks, synthetic data).

A neutral module: the doc-QA pipeline scores answers with it and `terse.synth` re-exports it, so
production code never imports the synthetic-data package. Normalisation forgives what does not change the answer: case, surrounding whitespace, a trailing
period, and for list answers the order and the separators (commas, "and", newlines, numbering).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_LIST_SPLIT = re.compile(r",|\n|;|\band\b")
_NUMBERING = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*•])\s*")


def normalize_answer(text: str) -> str:
    """Lower-cased, whitespace-collapsed text without surrounding quotes or a trailing period."""
    text = " ".join(text.strip().split()).lower()
    return text.strip("\"'").rstrip(".").strip()


def list_items(text: str) -> list[str]:
    """The items of a list answer ("a, b and c", "1. a\\n2. b"), normalised, empty ones dropped."""
    items = [normalize_answer(_NUMBERING.sub("", part)) for part in _LIST_SPLIT.split(text)]
    return [i for i in items if i]


def exact_match(prediction: str, answer: str, items: Sequence[str] = ()) -> bool:
    """True when `prediction` states exactly the gold answer (for lists: exactly the gold item set)."""
    if items:
        return set(list_items(prediction)) == {normalize_answer(i) for i in items}
    return normalize_answer(prediction) == normalize_answer(answer)


def contains_all(text: str, items: Sequence[str]) -> bool:
    """True when every gold item occurs in `text` (how a long-form Skeleton-of-Thought answer is scored)."""
    lowered = text.lower()
    return all(normalize_answer(i) in lowered for i in items)
