"""terse.synth: a seeded synthetic doc-QA world with known answers, and the reference model's data.

Worlds of people, companies, cities and products are rendered into documents; questions (single-hop,
multi-hop, list, needle-in-a-haystack) carry gold answers and gold documents. Splits never share an
entity name. A leaf package: from terse it imports only the shared prompt formats, the typed errors and
the answer matching it re-exports (`terse.answer_match`).
"""

from __future__ import annotations

from pathlib import Path

from terse.answer_match import contains_all, exact_match
from terse.synth.dataset import SplitConfig, SplitData, build_split, write_jsonl
from terse.synth.questions import QUESTION_KINDS, Question
from terse.synth.render import Document
from terse.synth.world import World, WorldConfig, build_world


def reference_model_path() -> Path:
    """Directory of the bundled reference model (trained on this world); see `terse.models`."""
    from terse.models import reference_model_path as path

    return path()


__all__ = [
    "QUESTION_KINDS",
    "Document",
    "Question",
    "SplitConfig",
    "SplitData",
    "World",
    "WorldConfig",
    "build_split",
    "build_world",
    "contains_all",
    "exact_match",
    "reference_model_path",
    "write_jsonl",
]
