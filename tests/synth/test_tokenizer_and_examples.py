"""The reference tokenizer round-trips generated text; training examples use the shared formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from terse.organize import formats
from terse.synth import SplitConfig, build_split
from terse.synth.examples import world_examples
from terse.synth.tokenizer import EOS, ROLE_TOKENS, render_chat, train_tokenizer

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "terse" / "models" / "reference"


@pytest.fixture(scope="module")
def reference_tokenizer() -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REFERENCE_DIR)


def test_reference_tokenizer_round_trips_every_generated_text(reference_tokenizer: object) -> None:
    tok = reference_tokenizer
    data = build_split("test", SplitConfig(num_worlds=2, needle_lengths=(512,), needle_depths=(0.5,)))
    texts = [d.text for d in data.documents] + [q.question for q in data.questions]
    texts += [q.answer for q in data.questions] + ["Les élèves — 東京 🙂 tabs\tand\r\nCRLF  double  spaces"]
    encoded = tok(texts, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    for text, ids in zip(texts, encoded):
        assert tok.decode(ids) == text  # type: ignore[attr-defined]
    assert len(tok) <= 8192  # type: ignore[arg-type]


def test_reference_tokenizer_specials_and_chat_template(reference_tokenizer: object) -> None:
    tok = reference_tokenizer
    assert tok.eos_token == EOS and tok.bos_token and tok.pad_token  # type: ignore[attr-defined]
    for special in (EOS, *ROLE_TOKENS[:3]):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1  # type: ignore[operator]
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id  # type: ignore[operator,attr-defined]
    messages = formats.qa_messages("Who?", [("d1", "Some text.")])
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
    assert rendered == render_chat(messages) and rendered.endswith("<|assistant|>\n")  # type: ignore[arg-type]


def test_train_tokenizer_small_vocab_round_trips() -> None:
    data = build_split("train", SplitConfig(num_worlds=1, needle_lengths=(), needle_depths=()))
    tok = train_tokenizer((d.text for d in data.documents), vocab_size=600)
    text = data.documents[0].text + " ünïcödé"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # type: ignore[attr-defined,operator]
    assert tok.eos_token == EOS  # type: ignore[attr-defined]


def test_training_examples_follow_the_shared_formats() -> None:
    examples = world_examples(0)
    assert examples == world_examples(0)
    kinds = {e.kind for e in examples}
    assert {"sot-skeleton", "sot-point", "dag-plan", "dag-synthesis", "needle", "lm"} <= kinds
    assert any(k.startswith("qa-compressed") for k in kinds) and any(k.startswith("qa-chunks") for k in kinds)
    for e in examples:
        if e.kind == "lm":
            assert e.prompt == ""
            continue
        assert e.prompt.startswith("<|system|>\n") and e.prompt.endswith("<|assistant|>\n")
        assert e.completion.strip() and "<|end|>" not in e.completion
        if e.kind == "sot-skeleton":
            assert formats.parse_skeleton(e.completion) is not None
        if e.kind == "dag-plan":
            plan = formats.parse_plan(e.completion)
            assert plan is not None and len(plan) == 2 and plan[1].dependency_ids == (1,)
