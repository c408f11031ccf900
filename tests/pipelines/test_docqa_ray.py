"""The doc-QA job on Ray Data (a real single-node cluster) gives the single-process answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from terse.pipelines.docqa import DocQAConfig, DocQAJob, JobPaths  # noqa: E402
from terse.pipelines.docqa.ray_job import RayOptions, ray_batches  # noqa: E402
from terse.pipelines.docqa.sample import write_synthetic  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    # more logical CPUs than physical cores: the actor pool and the driver's reads must all fit
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def answers(path: Path) -> dict[str, str]:
    return {r["id"]: r["answer"] for r in map(json.loads, path.read_text().splitlines())}


def test_ray_matches_single_process_and_resumes(tiny_llama: Path, tmp_path: Path, cluster: None) -> None:
    docs, questions = write_synthetic(tmp_path / "data", questions_per_kind=2, context_tokens=256)
    # one prompt per forward pass, so answers cannot depend on how questions were batched
    config = DocQAConfig(backend=f"hf:{tiny_llama}", backend_options={"max_batch_size": 1}).with_overrides(
        generation={"max_tokens": 6}, compression={"target_tokens": 160},
        retrieval={"min_context_tokens": 0}, run={"progress": False, "batch_size": 2}
    )
    local = JobPaths(questions, (docs,), tmp_path / "local.jsonl")
    DocQAJob(config, local).run()

    # resume on Ray: the first three answers are already on file, the cluster answers the rest
    done = local.output.read_text().splitlines()[:3]
    distributed = JobPaths(questions, (docs,), tmp_path / "ray.jsonl")
    distributed.output.write_text("".join(x + "\n" for x in done))
    job = DocQAJob(config, distributed)
    summary = job.run(batch_fn=ray_batches(job, RayOptions(num_actors=2)))
    num_questions = len(questions.read_text().splitlines())
    assert (summary.num_answered, summary.num_answered_this_run) == (num_questions, num_questions - 3)
    assert answers(distributed.output) == answers(local.output)
    assert len(distributed.output.read_text().splitlines()) == num_questions
