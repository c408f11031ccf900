"""Engine mode's whole OpenAI surface: logprobs (chat and completions, whole and streamed), every request
parameter honoured or refused with a 400 naming it, /v1/embeddings, /v1/models/{id} and /metrics."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from terse.backend import SamplingParams, load_backend
from terse.pipelines.server import ServerThread
from terse.pipelines.server.params import HONOURED, INERT, STRUCTURED
from tests.pipelines.test_server import (
    EMBEDDER,
    MESSAGES,
    MODEL,
    RecordingBackend,
    backend_specs,
    start_engine_server,
)


@pytest.fixture(scope="module", params=backend_specs())
def served(request: pytest.FixtureRequest, tiny_llama: Path) -> Iterator[tuple[ServerThread, RecordingBackend]]:
    backend = RecordingBackend(load_backend(f"{request.param}:{tiny_llama}"))
    server = start_engine_server(backend, max_tokens_limit=4096)
    yield server, backend
    server.stop()


@pytest.fixture
def client(served: tuple[ServerThread, RecordingBackend]) -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url=f"{served[0].url}/v1", max_retries=0, timeout=60)


def post(server: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


# -- logprobs ---------------------------------------------------------------------------------------------
def test_chat_logprobs_are_the_backends_and_stream_the_same(client: openai.OpenAI, served: Any) -> None:
    server, backend = served
    args: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0,
                            "logprobs": True, "top_logprobs": 3}
    answer = client.chat.completions.create(**args)
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and answer.usage is not None
    direct = backend.inner.submit(backend.render_chat(MESSAGES), SamplingParams(max_tokens=6, logprobs=3)).result(60)
    assert direct.logprobs is not None and len(content) == len(direct.logprobs)
    for entry, want in zip(content, direct.logprobs):
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert entry.token == backend.decode([want.token_id]) and entry.bytes == list(entry.token.encode())
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([lp for _, lp in want.top], abs=1e-4)
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks the likeliest
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None  # only when asked


def test_completions_logprobs_with_offsets_whole_and_streamed(served: Any) -> None:
    server, _ = served
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(chosen) for top, chosen
               in zip(lp["top_logprobs"], lp["token_logprobs"]))
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    tokens = [t for e in events for t in (e["choices"][0]["logprobs"] or {}).get("tokens", [])]
    offsets = [o for e in events for o in (e["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert tokens == lp["tokens"] and offsets == lp["text_offset"]
    zero = post(server, "/v1/completions", {**body, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert zero["top_logprobs"] is None and zero["token_logprobs"] == pytest.approx(lp["token_logprobs"])


@pytest.mark.parametrize(("body", "param"), [
    ({"logprobs": 1, "echo": True}, "logprobs"),  # echo + generation: not both
    ({"logprobs": 1, "echo": True, "max_tokens": 0}, "logprobs"),  # prompt logprobs have no alternatives
    ({"logprobs": 21}, "logprobs"),
])
def test_completions_logprobs_it_cannot_give_are_refused(served: Any, body: dict[str, Any], param: str) -> None:
    response = post(served[0], "/v1/completions", {"model": MODEL, "prompt": "The quick", "max_tokens": 2, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),  # chat's logprobs is a boolean
])
def test_chat_logprobs_bad_values(served: Any, body: dict[str, Any], param: str) -> None:
    response = post(served[0], "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


# -- every parameter honoured or refused ----------------------------------------------------------------------
NOT_DEFAULT: dict[str, Any] = {
    "frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"5": 10}, "store": True,
    "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "mp3"},
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "high", "verbosity": "low",
    "web_search_options": {}, "service_tier": "priority", "functions": [{"name": "f"}], "function_call": "auto",
    "suffix": "end", "best_of": 3,
}
DEFAULT: dict[str, Any] = {
    "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "store": False, "modalities": ["text"],
    "audio": None, "prediction": None, "reasoning_effort": None, "verbosity": None, "web_search_options": None,
    "service_tier": "auto", "functions": [], "function_call": None, "suffix": "", "best_of": 1,
}
CHAT_ONLY, COMPLETIONS_ONLY = {"suffix", "best_of"}, set(INERT) - {"frequency_penalty", "presence_penalty",
                                                                  "logit_bias", "suffix", "best_of"}


def _base(endpoint: str) -> dict[str, Any]:
    if endpoint == "chat":
        return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    return {"model": MODEL, "prompt": "The quick", "max_tokens": 2}


def test_the_tables_cover_every_parameter_tested_here() -> None:
    assert set(NOT_DEFAULT) == set(DEFAULT) == set(INERT)
    assert not (HONOURED["chat"] | HONOURED["completions"]) & set(INERT)
    assert {"response_format", "tools", "tool_choice", "parallel_tool_calls", "structured_outputs"} == STRUCTURED


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("name", sorted(INERT))
def test_inert_parameters_pass_at_their_default_and_are_refused_otherwise(served: Any, endpoint: str, name: str) -> None:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    foreign = name in (CHAT_ONLY if endpoint == "chat" else COMPLETIONS_ONLY)
    refused = post(served[0], path, {**_base(endpoint), name: NOT_DEFAULT[name]})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == name
    assert error["code"] == ("unknown_parameter" if foreign else "unsupported_parameter")
    at_default = post(served[0], path, {**_base(endpoint), name: DEFAULT[name]})
    assert at_default.status_code == (400 if foreign else 200), at_default.text


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("name", ["top_k", "min_p", "repetition_penalty", "guided_json", "whatever"])
def test_unknown_parameters_are_refused_by_both_endpoints(served: Any, endpoint: str, name: str) -> None:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    response = post(served[0], path, {**_base(endpoint), name: 1})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == name and "unrecognized" in error["message"]


@pytest.mark.parametrize(("patch", "param"), [
    ({"user": 5}, "user"),
    ({"safety_identifier": ["x"]}, "safety_identifier"),
    ({"prompt_cache_key": 1}, "prompt_cache_key"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages[0].colour"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                 {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[1]"),
])
def test_chat_fields_it_cannot_render_are_refused(served: Any, patch: dict[str, Any], param: str) -> None:
    response = post(served[0], "/v1/chat/completions", {**_base("chat"), **patch})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_annotations_and_null_fields_are_accepted(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=[*MESSAGES[:1], {"role": "user", "content": "hi", "name": None}],  # type: ignore[list-item]
        max_completion_tokens=3, user="u-1", metadata={"team": "a"}, safety_identifier="s", prompt_cache_key="k",
        service_tier="default", store=False, temperature=0,
    )
    assert answer.usage is not None and answer.usage.completion_tokens <= 3


def test_max_completion_tokens_and_ignore_eos_are_honoured(served: Any) -> None:
    body = {**_base("chat"), "max_completion_tokens": 7, "ignore_eos": True, "temperature": 0}
    body.pop("max_tokens")
    usage = post(served[0], "/v1/chat/completions", body).json()["usage"]
    assert usage["completion_tokens"] == 7


# -- models, embeddings, metrics ----------------------------------------------------------------------------
def test_model_by_id(client: openai.OpenAI, served: Any) -> None:
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve(EMBEDDER).id == EMBEDDER
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-9")


def test_embeddings_equal_sentence_transformers_in_both_encodings(client: openai.OpenAI, served: Any) -> None:
    from terse.retrieval.embedder import SentenceTransformerEmbedder

    texts = ["Alice works at Acme Corp.", "The quick brown fox."]
    got = client.embeddings.create(model=EMBEDDER, input=texts)  # the official client asks for base64
    want = SentenceTransformerEmbedder().embed_documents(texts)
    assert np.allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
    assert got.usage.prompt_tokens > 0 and got.model == EMBEDDER
    raw = post(served[0], "/v1/embeddings", {"model": EMBEDDER, "input": texts[0], "encoding_format": "float"}).json()
    assert np.allclose(raw["data"][0]["embedding"], want[0], atol=1e-5)
    b64 = post(served[0], "/v1/embeddings", {"model": EMBEDDER, "input": texts[0], "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), want[0], atol=1e-5)


@pytest.mark.parametrize(("patch", "status", "param"), [
    ({"input": [1, 2, 3]}, 400, "input"),  # token ids of some other tokenizer
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": "word " * 600}, 400, "input"),  # longer than the model's window: refused, never cut
    ({"dimensions": 8}, 400, "dimensions"),
    ({"encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "text-embedding-3-small"}, 404, "model"),
    ({"truncate": True}, 400, "truncate"),
])
def test_bad_embedding_requests(served: Any, patch: dict[str, Any], status: int, param: str) -> None:
    response = post(served[0], "/v1/embeddings", {"model": EMBEDDER, "input": "hello", **patch})
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text


def _samples(server: Any) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def test_metrics_are_prometheus_text_with_engine_and_savings_series(client: openai.OpenAI, served: Any) -> None:
    server, backend = served
    before = _samples(server)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0)
    after = _samples(server)
    assert all(name.startswith("terse_") for name in after)
    key = "terse_requests_total{endpoint=/v1/chat/completions,status=200}"
    assert after[key] == before.get(key, 0) + 1
    assert after["terse_prompt_tokens_original_total"] > before.get("terse_prompt_tokens_original_total", 0)
    assert after["terse_prompt_tokens_saved_total"] == before.get("terse_prompt_tokens_saved_total", 0)
    assert after["terse_request_duration_seconds_count{endpoint=/v1/chat/completions}"] >= 1
    if hasattr(backend.inner, "scheduler"):  # the local engine exports its counters and gauges
        assert after["terse_engine_requests_running"] == 0 and after["terse_engine_requests_waiting"] == 0
        assert 0 <= after["terse_engine_kv_cache_usage_ratio"] <= 1
        assert after["terse_engine_decode_tokens_total"] > before.get("terse_engine_decode_tokens_total", 0)
        assert "terse_engine_preemptions_total" in after and "terse_engine_prefix_cache_hit_tokens_total" in after


def test_unknown_v1_paths_are_404_in_engine_mode(served: Any) -> None:
    response = httpx.post(f"{served[0].url}/v1/audio/speech", json={"input": "hi"})
    assert response.status_code == 404 and "not served here" in response.json()["error"]["message"]


def test_tokenize_renders_chat_messages(served: Any) -> None:
    server, backend = served
    body = post(server, "/tokenize", {"model": MODEL, "messages": MESSAGES}).json()
    assert body["tokens"] == backend.encode(backend.render_chat(MESSAGES))


def test_engine_stats_are_read_only_counters(tiny_llama: Path) -> None:
    engine = load_backend(f"local:{tiny_llama}", num_kv_blocks=32)
    try:
        stats = engine.stats  # type: ignore[attr-defined]
        assert stats["num_kv_blocks"] == 32 and stats["num_free_kv_blocks"] == 32
        assert stats["num_running"] == stats["num_waiting"] == 0
    finally:
        engine.close()


def test_top_p_seed_and_echo_are_honoured(served: Any) -> None:
    server, _ = served
    chat = {**_base("chat"), "max_tokens": 6}
    greedy = post(server, "/v1/chat/completions", {**chat, "temperature": 0}).json()["choices"][0]["message"]
    nucleus = post(server, "/v1/chat/completions", {**chat, "temperature": 1.5, "top_p": 1e-6}).json()
    assert nucleus["choices"][0]["message"] == greedy  # a nucleus of one token is greedy, whatever the heat
    sampled = [post(server, "/v1/chat/completions", {**chat, "temperature": 1.5, "seed": s}).json() for s in (1, 1, 2)]
    texts = [r["choices"][0]["message"]["content"] for r in sampled]
    assert texts[0] == texts[1]
    body = {"model": MODEL, "prompt": "The quick", "max_tokens": 3, "temperature": 0}
    plain = post(server, "/v1/completions", body).json()["choices"][0]["text"]
    echoed = post(server, "/v1/completions", {**body, "echo": True}).json()["choices"][0]["text"]
    assert echoed == "The quick" + plain
