"""The doc-QA job over HTTP answers exactly as on the local engine: the openai: backend sends chat to
/v1/chat/completions, so the served model's template applies (it used to get a "Role: content" transcript)."""

from __future__ import annotations

from pathlib import Path

from terse.backend.registry import load_backend
from terse.pipelines.docqa import DocQAJob, JobPaths
from tests.conftest import backend_over_http
from tests.pipelines.test_docqa_job import config_for, read_jsonl, synth  # noqa: F401  (module fixture)


def test_docqa_over_http_answers_as_the_local_engine(
    tiny_llama: Path, synth: tuple[Path, Path], tmp_path: Path  # noqa: F811
) -> None:
    docs, questions = synth
    config = config_for(tiny_llama, organize={"mode": "off"})
    answers = {}
    local = load_backend(f"local:{tiny_llama}", num_kv_blocks=128)
    try:
        for name, backend_cm in (("local", None), ("http", backend_over_http(tiny_llama))):
            out = tmp_path / name / "answers.jsonl"
            out.parent.mkdir()
            if backend_cm is None:
                DocQAJob(config, JobPaths(questions, (docs,), out), backend=local).run()
            else:
                with backend_cm as remote:
                    DocQAJob(config, JobPaths(questions, (docs,), out), backend=remote).run()
            answers[name] = {r["id"]: (r["answer"], r["usage"]["prompt_tokens"]) for r in read_jsonl(out)}
    finally:
        local.close()
    assert answers["http"] == answers["local"] and len(answers["local"]) == 6
