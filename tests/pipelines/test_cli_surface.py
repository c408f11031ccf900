"""What a person sees from `terse serve` and `terse docqa`: configuration errors as one line naming the
value and the fix (exit 2), and quiet, true output."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from terse.pipelines.cli import main
from tests.pipelines.test_docqa_job import read_jsonl, synth  # noqa: F401  (module fixture)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


SERVE_ERRORS = [
    (["--port", "99999"], "--port 99999 must be in 0..65535"),
    (["--upstream", "notaurl"], "--upstream 'notaurl' must start with http://"),
    (["--model", "/no/such/model"], "--model '/no/such/model' is neither a backend spec"),
    (["--compress", "--compress-rate", "7"], "--compress-rate 7.0 must be in (0, 1]"),
    (["--upstream", "http://127.0.0.1:9/v1", "--compress-rate", "0.5"], "need --compress"),
    (["--upstream", "http://127.0.0.1:9/v1", "--compress", "--compress-target", "0"], "--compress-target 0 must be >= 1"),
    (["--max-body-bytes", "0"], "--max-body-bytes 0 must be >= 1"),
    (["--retrieve-index", "/no/such/index"], "--retrieve-index '/no/such/index' is not a directory"),
    (["--upstream", "http://127.0.0.1:9/v1", "--embedding-model", "m"], "--embedding-model is for engine mode"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' does not resolve"),
    (["--kv-cache-memory", "huge"], "--kv-cache-memory 'huge' is neither a fraction nor a size"),
    (["--sparse-patterns", "/no/such.json"], "--sparse-patterns '/no/such.json' is not a file"),
    (["--upstream", "http://127.0.0.1:9/v1", "--sparse-prefill"], "--sparse-prefill configure the local engine"),
]


@pytest.mark.parametrize(("flags", "expected"), SERVE_ERRORS, ids=[" ".join(f) for f, _ in SERVE_ERRORS])
def test_serve_configuration_errors_are_one_line(
    tiny_llama: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    mode = [] if "--upstream" in flags or "--model" in flags else ["--model", str(tiny_llama)]
    assert main(["serve", *mode, *flags, "--verbose"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("terse serve: error: ") and expected in err, err


def test_serve_refuses_a_port_in_use_before_loading_the_model(
    tiny_llama: Path, busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--model", str(tiny_llama), "--port", str(busy_port), "--verbose"]) == 2
    err = capsys.readouterr().err
    assert f"--port {busy_port}" in err and "pick a free port" in err


def test_docqa_without_backend_uses_the_reference_model_and_says_so(
    tiny_llama: Path, synth: tuple[Path, Path], tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from terse.pipelines import cli_demo

    monkeypatch.setattr(cli_demo, "default_backend", lambda: f"hf:{tiny_llama}")  # the tiny model stands in
    docs, questions = synth
    out = tmp_path / "sub" / "answers.jsonl"  # its folder is made
    argv = ["docqa", "--docs", str(docs), "--questions", str(questions), "--out", str(out), "--max-tokens", "3",
            "--no-retrieval"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"no --backend given; answering with the bundled reference model (hf:{tiny_llama})" in captured.err
    # one progress bar, never an empty one ("0q [..." ; a rate such as "3.20q/s" is fine)
    assert not re.search(r"(?<![\d.])0q", captured.err) and "6/6" in captured.err
    assert "failures:" not in captured.out and not out.with_name("answers.failures.jsonl").exists()
    assert main(argv) == 0  # resumed with nothing left: the job's real time and rate, not 0.0 s
    rerun = capsys.readouterr()
    assert "this run)" in rerun.out and "0.00 questions/s" not in rerun.out and "q/s" not in rerun.err
    summary = json.loads(out.with_name("answers.summary.json").read_text())
    assert summary["total_wall_s"] > summary["wall_s"] and summary["questions_per_s"] > 0
    assert len(read_jsonl(out)) == 6


def test_docqa_configuration_errors_name_the_flag(
    synth: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    docs, questions = synth
    base = ["docqa", "--docs", str(docs), "--questions", str(questions), "--out", str(tmp_path / "a.jsonl")]
    for extra, expected in [
        (["--top-k", "0"], "--top-k 0 must be an int >= 1"),
        (["--budget", "-5"], "--budget -5 must be an int >= 1"),
        (["--backend", "local:/no/such/model"], "--backend 'local:/no/such/model': '/no/such/model' is not a model"),
        (["--backend", "vllm:x"], "backend spec 'vllm:x' is not of the form"),
        (["--docs", str(tmp_path / "nothing")], "does not exist; check the path given to --docs"),
    ]:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
