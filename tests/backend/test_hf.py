"""HFBackend: batched left-padded generation equals transformers' per-prompt generate; scores; contract."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from terse.backend import SamplingParams, load_backend
from terse.backend.hf import HFBackend
from terse.errors import InvalidRequestError, ModelLoadError

PROMPTS = [
    "Alice works at",
    "The quick brown fox jumps over the lazy dog. Question: Where does Alice work?",
    "Numbers like 3.14",
    "A paged KV cache stores keys and values in fixed-size blocks shared between",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request: pytest.FixtureRequest, tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory(request.param)


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> HFBackend:
    b = HFBackend(model_dir, max_batch_size=8)
    yield b
    b.close()


def _reference_greedy(model_dir: Path, prompt: str, max_new: int) -> list[int]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_batched_greedy_equals_transformers_generate(backend: HFBackend, model_dir: Path) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    results = backend.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, results):
        assert list(result.token_ids) == _reference_greedy(model_dir, prompt, 12)
        assert result.finish_reason == "length"
        assert result.usage.completion_tokens == 12
        assert result.usage.prompt_tokens == len(backend.tokenizer(prompt).input_ids)


def test_score_matches_direct_log_softmax(backend: HFBackend, model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefix, text = "Question: Where does Alice work?", " Answer: Acme Corp."
    [scores] = backend.score([text], prefix=prefix)
    ctx = tok(prefix).input_ids
    ids = ctx + tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(scores.token_ids)]
    assert list(scores.token_ids) == ids[len(ctx) :]
    assert scores.logprobs == pytest.approx(expected, abs=1e-4)
    assert [text[a:b] for a, b in scores.offsets] == [tok.decode([t]) for t in scores.token_ids]


def test_score_without_prefix_conditions_on_bos_or_nan(backend: HFBackend) -> None:
    [s] = backend.score(["Alice works at Acme"])
    has_bos = backend.tokenizer("x").input_ids[0] == backend.tokenizer.bos_token_id
    assert math.isnan(s.logprobs[0]) != has_bos
    assert all(not math.isnan(v) for v in s.logprobs[1:])


def test_stop_strings_deltas_and_seeds(backend: HFBackend) -> None:
    free = backend.generate(["Alice works at"], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    handle = backend.submit("Alice works at", SamplingParams(max_tokens=16, stop=(stop,), ignore_eos=True))
    deltas = list(handle)
    result = handle.result()
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index(stop)]
    assert "".join(deltas) == result.text
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a, b = backend.generate(["Alice", "Alice"], sampled)
    assert a.token_ids == b.token_ids


def test_cancel_and_bad_input_keep_serving(backend: HFBackend) -> None:
    long = backend.submit("Alice", SamplingParams(max_tokens=1500, ignore_eos=True))
    next(iter(long))  # generation is under way
    long.cancel()
    cancelled = long.result(timeout=60)
    assert cancelled.finish_reason == "abort"
    assert 0 < cancelled.usage.completion_tokens < 1500
    with pytest.raises(InvalidRequestError, match="empty"):
        backend.submit("", SamplingParams())
    with pytest.raises(InvalidRequestError, match="at most"):
        backend.submit("word " * 5000, SamplingParams())
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(backend.generate(["Alice"], SamplingParams(max_tokens=3))[0].text))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1


def test_chat_and_spec_and_unknown_path(tiny_llama: Path, tmp_path: Path) -> None:
    with load_backend(f"hf:{tiny_llama}") as b:
        text = b.render_chat([{"role": "user", "content": "hi"}])
        assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"
        assert b.count_tokens("Alice works") == len(b.encode("Alice works"))
        assert b.decode(b.encode("Alice works")) == "Alice works"
    with pytest.raises(ModelLoadError, match="could not load"):
        HFBackend(tmp_path / "missing")
