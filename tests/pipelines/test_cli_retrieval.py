"""`terse index` and `terse search` on a folder of documents, in-process, with the default embedder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import pytest

from terse.pipelines import cli, cli_index, cli_search


def _run(module: ModuleType, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    code: int = module.run(parser.parse_args(argv))
    return code


@pytest.fixture
def one_torch_thread() -> object:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small MiniLM batches on a shared 2-core machine
    yield
    torch.set_num_threads(previous)


def test_commands_are_registered() -> None:
    assert cli.COMMANDS["index"][0] == "terse.pipelines.cli_index"
    assert cli.COMMANDS["search"][0] == "terse.pipelines.cli_search"


def test_index_then_search_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_torch_thread: object
) -> None:
    docs = tmp_path / "docs"
    (docs / "notes").mkdir(parents=True)
    (docs / "lighthouse.md").write_text(
        "# The lighthouse\n\nThe Kelmora lighthouse was built in 1871 on a granite reef. "
        "Its lamp burns whale oil and can be seen for twenty miles.", encoding="utf-8")
    (docs / "bakery.txt").write_text(
        "The corner bakery opens at six. It sells rye bread, pretzels and plum cake.", encoding="utf-8")
    (docs / "notes" / "trains.jsonl").write_text(
        json.dumps({"id": "train-1", "text": "The night train to Varsk leaves platform nine at 23:40."}) + "\n",
        encoding="utf-8")
    index = tmp_path / "index"
    assert _run(cli_index, [str(docs), "-o", str(index), "--no-progress", "--chunk-tokens", "64",
                            "--overlap-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "3 added" in out and "flat index" in out

    assert _run(cli_search, [str(index), "When was the lighthouse built?", "-k", "2", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits[0]["doc_id"] == "lighthouse.md" and hits[0]["rank"] == 1 and len(hits) == 2
    text = (docs / "lighthouse.md").read_text(encoding="utf-8")
    assert text[hits[0]["char_start"] : hits[0]["char_end"]] == hits[0]["text"]

    assert _run(cli_search, [str(index), "night train platform", "--mode", "bm25"]) == 0
    assert capsys.readouterr().out.startswith("1. train-1 ")

    # a changed file is re-embedded, the others are skipped
    (docs / "bakery.txt").write_text("The corner bakery now closes on Mondays.", encoding="utf-8")
    assert _run(cli_index, [str(docs), "-o", str(index), "--no-progress"]) == 0
    assert "0 added, 1 updated, 2 unchanged; 1 chunks embedded" in capsys.readouterr().out
    assert _run(cli_search, [str(index), "bakery", "--mode", "dense", "-k", "1", "--doc-id", "bakery.txt"]) == 0
    assert "closes on Mondays" in capsys.readouterr().out


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(cli_search, [str(tmp_path / "nowhere"), "query"]) == 2
    assert "no index at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run(cli_index, [str(tmp_path / "empty"), "-o", str(tmp_path / "idx"), "--no-progress"]) == 2
    assert "no .txt, .md, .jsonl or .pdf documents" in capsys.readouterr().err
