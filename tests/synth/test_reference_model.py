"""The shipped reference model: loads with plain transformers, follows the shared formats greedily,
and (once retrained, see its model card) answers test questions from their documents."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from terse.organize import formats
from terse.synth import SplitConfig, build_split, exact_match, reference_model_path
from terse.synth.tokenizer import render_chat


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = reference_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def data() -> Any:
    return build_split("test", SplitConfig(num_worlds=1, questions_per_kind=4, needle_lengths=(), needle_depths=()))


def _greedy(model: Any, tok: Any, messages: list[Any], max_new_tokens: int = 48) -> tuple[str, bool]:
    enc = tok(render_chat(messages), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1] :]
    return tok.decode(new, skip_special_tokens=True).strip(), bool(new[-1] == tok.eos_token_id)


def test_model_files_match_the_documented_shape(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tok = model_and_tokenizer
    c = model.config
    assert c.architectures == ["LlamaForCausalLM"] and c.model_type == "llama"
    assert (c.num_attention_heads, c.num_key_value_heads) == (8, 2)
    assert c.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    assert c.vocab_size == len(tok) and c.max_position_embeddings >= 4096
    weights = reference_model_path() / "model.safetensors"
    assert weights.stat().st_size <= 15 * 2**20
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118  (safe_open is not iterable)


def test_greedy_output_follows_the_shared_formats(model_and_tokenizer: tuple[Any, Any], data: Any) -> None:
    model, tok = model_and_tokenizer
    single = next(q for q in data.questions if q.kind == "single")
    listq = next(q for q in data.questions if q.kind == "list")
    multi = next(q for q in data.questions if q.kind == "multi")

    def ctx(q: Any) -> list[tuple[str, str]]:
        return [(i, data.document(i).text) for i in q.doc_ids]

    answer, ended = _greedy(model, tok, formats.qa_messages(single.question, ctx(single)))
    assert answer and ended and "\n" not in answer
    skeleton, ended = _greedy(model, tok, formats.skeleton_messages(listq.question, ctx(listq)), 64)
    assert ended and formats.parse_skeleton(skeleton) is not None, skeleton
    plan, ended = _greedy(model, tok, formats.plan_messages(multi.question, ctx(multi)), 64)
    steps = formats.parse_plan(plan)
    assert ended and steps is not None and len(steps) >= 2, plan


def test_answers_test_questions_from_their_gold_documents(model_and_tokenizer: tuple[Any, Any], data: Any) -> None:
    model, tok = model_and_tokenizer
    questions = [q for q in data.questions if q.kind == "single"][:6]
    correct = 0
    for q in questions:
        answer, _ = _greedy(model, tok, formats.qa_messages(q.question, [(i, data.document(i).text) for i in q.doc_ids]))
        correct += exact_match(answer, q.answer)
    assert len(questions) >= 4
    assert correct >= len(questions) - 1, f"{correct}/{len(questions)} correct"
