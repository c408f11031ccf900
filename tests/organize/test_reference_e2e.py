"""SoT and DAG end to end on the trained reference model (skipped until its weights are in the package).

The reference model is trained on exactly the formats of terse.organize.formats, so its skeletons and
plans usually parse (a weak model also repeats points or stops a plan early: those take the fallback);
the checks are on structure and fallbacks, not on answer quality.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import terse
from terse.backend.base import Backend
from terse.backend.types import SamplingParams

REFERENCE = Path(terse.__file__).parent / "models" / "reference"
pytestmark = pytest.mark.skipif(
    not (REFERENCE / "config.json").exists() or not any(REFERENCE.glob("*.safetensors")),
    reason="the reference model's weights are not in terse/models/reference yet",
)


@pytest.fixture(scope="module")
def reference() -> Iterator[Backend]:
    backend = terse.load_backend(f"local:{REFERENCE}", num_kv_blocks=1024)  # 16K tokens: plenty here
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def questions() -> dict[str, list[tuple[str, list[tuple[str, str]]]]]:
    from terse.synth.dataset import SplitConfig, build_split

    data = build_split("validation", SplitConfig(num_worlds=1, questions_per_kind=2, needle_lengths=(),
                                                 needle_depths=(), context_tokens=512))
    out: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {"single": [], "multi": [], "list": []}
    for q in data.questions:
        out[q.kind].append((q.question, [(i, data.document(i).text) for i in q.context_doc_ids]))
    return out


def test_sot_on_list_questions(reference: Backend, questions: dict) -> None:  # type: ignore[type-arg]
    from terse.organize.skeleton import SkeletonOfThought, SoTConfig

    config = SoTConfig(skeleton_params=SamplingParams(max_tokens=96), point_params=SamplingParams(max_tokens=48))
    sot = SkeletonOfThought(reference, config)
    results = [sot.run(question, contexts) for question, contexts in questions["list"]]
    assert any(r.mode == "sot" for r in results), [r.reason for r in results]
    for r in results:
        assert r.text.strip(), r.reason  # never an empty answer
        if r.mode == "sot":
            assert len(r.points) >= 2
            assert r.text.splitlines()[0].startswith("1. ")
            assert r.usage.cached_prompt_tokens > 0  # the expansions shared the skeleton prefix
        else:
            assert "skeleton did not parse" in r.reason
    direct = sot.run(*questions["single"][0])
    assert direct.mode == "direct" and [s.name for s in direct.calls] == ["direct"]


def test_dag_on_multi_hop_questions(reference: Backend, questions: dict) -> None:  # type: ignore[type-arg]
    from terse.organize.dag import DagConfig, DagDecomposition

    dag = DagDecomposition(reference, DagConfig())
    results = [dag.run(question, contexts) for question, contexts in questions["multi"]]
    assert any(r.mode == "dag" for r in results), [r.reason for r in results]
    for r in results:
        assert r.text.strip(), r.reason
        if r.mode == "dag":
            assert r.waves == ((1,), (2,)) and r.critical_path_ids == (1, 2)
            assert [s.name for s in r.calls] == ["plan", "wave-1", "wave-2", "synthesis"]
        else:
            assert r.reason.startswith("plan ") and [s.name for s in r.calls] == ["plan", "direct"]
    strict = DagDecomposition(reference, DagConfig(min_steps=3)).run(*questions["multi"][0])
    assert strict.mode == "direct" and strict.text.strip()
