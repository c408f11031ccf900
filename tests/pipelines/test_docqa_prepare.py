"""Preparing a batch on several threads gives the prompts of one-at-a-time preparation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from terse.backend.local.engine import LocalEngine
from terse.pipelines.docqa import DocQAConfig
from terse.pipelines.docqa.answerer import BatchAnswerer
from terse.pipelines.docqa.inputs import load_corpus, read_questions
from terse.pipelines.docqa.prepare import PreparedQuestion
from terse.pipelines.docqa.sample import write_synthetic


def test_concurrent_preparation_matches_sequential(tiny_llama: Path, tmp_path: Path) -> None:
    docs, questions_path = write_synthetic(tmp_path / "data", questions_per_kind=2, context_tokens=256)
    corpus = load_corpus([docs])
    questions = read_questions(questions_path)
    # one question names a document that is not in the corpus: it fails alone, in its place
    broken = dataclasses.replace(questions[1], doc_ids=("no-such-document",))
    batch = [questions[0], broken, *questions[2:]]
    # the token pruner makes compression call the engine: those calls come from several threads at once
    config = DocQAConfig(backend=f"local:{tiny_llama}").with_overrides(
        compression={"target_tokens": 120, "token_pruner": True}, retrieval={"enabled": False})
    with LocalEngine.from_spec(str(tiny_llama), num_kv_blocks=512, kv_block_size=16) as engine:
        preparer = BatchAnswerer(config, engine, corpus).preparer
        assert preparer.compressor is not None and preparer.compressor.scorer is engine
        one_by_one = preparer.prepare_all(batch, workers=1)
        together = preparer.prepare_all(batch, workers=4)
    assert isinstance(together[1], Exception) and isinstance(one_by_one[1], Exception)
    assert str(together[1]) == str(one_by_one[1])
    others = [(a, b) for i, (a, b) in enumerate(zip(one_by_one, together)) if i != 1]
    assert len(others) == len(batch) - 1
    for a, b in others:
        assert isinstance(a, PreparedQuestion) and isinstance(b, PreparedQuestion)
        assert (b.record.id, b.prompt, b.sources) == (a.record.id, a.prompt, a.sources)
        assert a.original_prompt_tokens > 120
