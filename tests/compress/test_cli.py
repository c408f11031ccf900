"""`terse compress` end to end: files and stdin, rate and target, JSON stats, helpful failures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from terse.pipelines.cli import main
from tests.compress.corpus import make_docset


def test_compress_files_with_a_scorer_prints_json_stats(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_docset(seed=3, num_docs=3)
    paths = []
    for i, doc in enumerate(data.docs):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    code = main(["compress", *map(str, paths), "--target", "80", "--question", data.question, "--scorer",
                 f"hf:{tiny_llama}", "--ranker", "bm25", "--pruner", "parallel", "--protect", "numbers", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compressed_tokens"] <= out["target_tokens"] == 80
    assert out["context_order"][0] == data.gold
    assert out["text"].endswith(data.question)
    assert len(out["contexts"]) == 3 and out["unit"] == "tokens"


def test_compress_stdin_without_a_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("terse.pipelines.cli_compress._REFERENCE", tmp_path)  # as if none were installed
    monkeypatch.setattr("sys.stdin", io.StringIO("one two three four five six seven eight nine ten"))
    assert main(["compress", "--rate", "0.5", "--ranker", "bm25", "--pruner", "none"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 5
    assert "10 -> 5 words" in captured.err
    with pytest.raises(SystemExit, match="no reference model"):
        main(["compress", "--rate", "0.5"])


def test_compress_reports_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "d.txt"
    doc.write_text("a b c", encoding="utf-8")
    assert main(["compress", str(doc), "--rate", "1.5", "--ranker", "bm25", "--pruner", "none"]) == 2
    assert "rate=1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read"):
        main(["compress", str(tmp_path / "missing.txt"), "--rate", "0.5", "--ranker", "bm25", "--pruner", "none"])
