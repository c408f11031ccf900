"""`terse sparse-patterns` end to end on a tiny model."""

from __future__ import annotations

from terse.kernels.patterns import load_patterns
from terse.pipelines.cli import main


def test_writes_a_loadable_patterns_file(tiny_llama, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Alice works at Acme Corp in Paris. The quick brown fox jumps over the lazy dog. ")
    out = tmp_path / "patterns.json"
    code = main(["sparse-patterns", str(tiny_llama), "--prompt-file", str(prompt), "--length", "128",
                 "--rows", "16", "--block-size", "16", "--out", str(out)])
    assert code == 0
    patterns = load_patterns(out)
    assert patterns.num_layers == 2 and patterns.model_name == str(tiny_llama)
    assert "heads" in capsys.readouterr().out


def test_missing_prompt_file_is_a_clean_error(tiny_llama, tmp_path, capsys):
    code = main(["sparse-patterns", str(tiny_llama), "--prompt-file", str(tmp_path / "none.txt")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
