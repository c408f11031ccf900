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


def test_compress_keeps_the_answer_and_counts_in_the_target_tokenizer(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = ("Some other words here that do not matter at all for the question at hand. "
            "Lirois was founded in 1958 by Nils Berg. More filler follows, and it says nothing useful.")
    args = ["compress", "--rate", "0.5", "--question", "When was Lirois founded?", "--ranker", "bm25", "--pruner",
            "none", "--target-tokenizer", str(tiny_llama), "--json"]
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert "Lirois was founded in 1958" in out["text"] and "filler" not in out["text"]
    assert out["unit"] == "tokens" and out["tokenizer"] == str(tiny_llama)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tiny_llama).encode(out["text"], add_special_tokens=False)) == (
        out["compressed_tokens"])


def test_default_protections_and_their_opt_outs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("terse.pipelines.cli_compress._REFERENCE", tmp_path)  # word counts, no model
    text = "Write to ops@example.com or see https://example.com/a/b?x=y before May 5, 2024 about 一千五百万 units."
    base = ["compress", "--target", "18", "--ranker", "none", "--pruner", "none"]
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(base) == 0
    kept = capsys.readouterr().out
    for fact in ("ops@example.com", "https://example.com/a/b?x=y", "May 5, 2024", "一千五百万"):
        assert fact in kept
    # unprotected: reading order, cut inside the date
    prefix = ["Write", "to", "ops@example.com", "or", "see", "https://example.com/a/b?x=y", "before"]
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main([*base, "--target", "8", "--no-default-protection"]) == 0
    assert capsys.readouterr().out.split() == [*prefix, "May"]
    # protected spans come first, each whole: with URLs and e-mails unprotected, the date and the amount
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main([*base, "--no-protect", "urls", "--no-protect", "emails", "--target", "4"]) == 0
    assert capsys.readouterr().out.split() == ["May", "5,", "2024", "一千五百万"]
