"""How quantization is asked for: QuantizationConfig values, EngineConfig / load_backend, the doc-QA
job's backend_options, `terse serve --quantization`, and `terse quantize`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from terse.backend import load_backend
from terse.backend.local.config import EngineConfig
from terse.backend.local.quant.config import QuantizationConfig
from terse.backend.local.quant.modules import Int4Linear
from terse.errors import ConfigError


def is_quantized(backend: Any) -> bool:
    return any(isinstance(m, Int4Linear) for m in backend.runner.model.modules())


def test_config_values() -> None:
    assert QuantizationConfig.parse(None) is None
    assert QuantizationConfig.parse("int4") == QuantizationConfig.parse("INT4") == QuantizationConfig()
    parsed = QuantizationConfig.parse({"method": "int4", "group_size": 64, "scheme": "sym",
                                       "calibration_prompts": ["a text"]})
    assert parsed == QuantizationConfig(group_size=64, scheme="sym", calibration_prompts=("a text",))
    assert EngineConfig(quantization="int4").quantization == QuantizationConfig()  # type: ignore[arg-type]
    for bad, match in [("int8", "'int4'"), ({"group_size": 48}, "group_size=48"), ({"bits": 3}, "bits=3"),
                       ({"scheme": "nf4"}, "scheme='nf4'"), ({"groupsize": 64}, "unknown quantization fields"),
                       ({"calibration_prompts": "one string"}, "list of non-empty texts"), (4, "must be 'int4'")]:
        with pytest.raises(ConfigError, match=match):
            EngineConfig(quantization=bad)  # type: ignore[arg-type]


def test_doc_qa_backend_options_reach_the_engine(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from terse.pipelines.docqa import DocQAConfig, DocQAJob, JobPaths
    from terse.pipelines.docqa import job as job_module
    from terse.pipelines.docqa.sample import write_synthetic

    docs, questions = write_synthetic(tmp_path / "data", questions_per_kind=1, context_tokens=128, kinds=("single",))
    built: list[Any] = []

    def recording_load(spec: str, **options: Any) -> Any:
        backend = load_backend(spec, **options)
        built.append(backend)
        return backend

    monkeypatch.setattr(job_module, "load_backend", recording_load)
    config = DocQAConfig.from_dict({  # as a TOML / JSON job file gives it
        "backend": f"local:{tiny_llama}",
        "backend_options": {"num_kv_blocks": 256, "quantization": {"group_size": 32, "awq": False}},
        "retrieval": {"enabled": False}, "compression": {"enabled": False},
        "generation": {"max_tokens": 4}, "run": {"progress": False},
    })
    summary = DocQAJob(config, JobPaths(questions, (docs,), tmp_path / "answers.jsonl")).run()
    assert summary.num_answered == summary.num_questions > 0 and summary.num_failed == 0
    assert len(built) == 1 and is_quantized(built[0])
    assert built[0].config.quantization == QuantizationConfig(group_size=32, awq=False)


def test_serve_quantization_flags(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from terse.backend import registry
    from terse.pipelines import cli_serve
    from terse.pipelines.server import ServerThread

    captured: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app))
    real_load = registry.load_backend
    monkeypatch.setattr(registry, "load_backend",
                        lambda spec, **kw: captured.setdefault("backend", real_load(spec, num_kv_blocks=128, **kw)))
    parser = argparse.ArgumentParser()
    cli_serve.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_llama), "--quantization", "int4", "--quantization-group-size", "32",
                              "--quantization-scheme", "sym", "--no-quantization-awq", "--port", "0"])
    assert cli_serve.run(args) == 0
    backend = captured["backend"]
    assert backend.config.quantization == QuantizationConfig(group_size=32, scheme="sym", awq=False)
    assert is_quantized(backend)
    with ServerThread(captured["app"]) as server:
        body = {"model": backend.model_name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    backend.close()
    for argv, match in [(["--model", "x", "--quantization-group-size", "64"], "need --quantization int4"),
                        (["--model", "hf:x", "--quantization", "int4"], "configure the local engine")]:
        with pytest.raises(ConfigError, match=match):
            cli_serve._engine_options(parser.parse_args(argv))


def test_quantize_command_writes_a_loadable_checkpoint(tiny_llama: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from terse.pipelines.cli import main

    prompts = tmp_path / "calibration.txt"
    prompts.write_text("Alice works at Acme Corp in Paris. Bob founded Globex in 1998. " * 20)
    out = tmp_path / "int4"
    assert main(["quantize", str(tiny_llama), "-o", str(out), "--group-size", "32", "--lm-head",
                 "--calibration-file", str(prompts), "--device", "cpu"]) == 0
    assert "AWQ output error" in capsys.readouterr().out
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    assert settings["group_size"] == 32 and settings["lm_head"] is True
    engine = load_backend(f"local:{out}", num_kv_blocks=64)
    try:
        assert is_quantized(engine) and isinstance(engine.runner.model.lm_head, Int4Linear)
    finally:
        engine.close()
    try:  # a usage error: one line on stderr and exit status 2 (or the ConfigError itself, by version)
        code = main(["quantize", str(out), "-o", str(tmp_path / "again")])
    except ConfigError as e:
        assert "already quantized" in str(e)
    else:
        assert code == 2 and "already quantized" in capsys.readouterr().err
