"""The openai: backend keeps the served model's chat template: through a real `terse serve`, chat answers
and counts equal the local engine's on the same weights (with and without a local tokenizer)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from terse.backend import SamplingParams, load_backend
from terse.backend.openai_tokens import RenderedChat
from tests.conftest import backend_over_http

CONVERSATIONS = [
    [{"role": "user", "content": "Where does Alice work?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who founded Globex?"},
     {"role": "assistant", "content": "Bob."}, {"role": "user", "content": "When?"}],
]
PARAMS = SamplingParams(max_tokens=8)


def test_render_chat_and_generate_match_the_local_engine(tiny_llama: Path) -> None:
    local = load_backend(f"local:{tiny_llama}", num_kv_blocks=64)
    try:
        with backend_over_http(tiny_llama) as remote:
            for messages in CONVERSATIONS:
                rendered = remote.render_chat(messages)  # type: ignore[arg-type]
                assert isinstance(rendered, RenderedChat)  # no local template: the server applies its own
                want = local.generate([local.render_chat(messages)], PARAMS)[0]  # type: ignore[arg-type]
                got = remote.generate([rendered], PARAMS)[0]
                assert got.text == want.text and got.usage.prompt_tokens == want.usage.prompt_tokens
                assert remote.count_tokens(rendered) == local.count_tokens(local.render_chat(messages))  # type: ignore[arg-type]
                assert remote.generate([rendered + ""], PARAMS)[0].text == want.text  # still a chat
    finally:
        local.close()


def test_with_a_local_tokenizer_the_template_is_applied_here(tiny_llama: Path) -> None:
    local = load_backend(f"local:{tiny_llama}", num_kv_blocks=64)
    try:
        with backend_over_http(tiny_llama) as remote:
            url = remote.config.base_url  # type: ignore[attr-defined]
            exact = load_backend(f"openai:{url}#tiny", tokenizer=str(tiny_llama), api_key="unused")
            try:
                messages = CONVERSATIONS[1]
                rendered = exact.render_chat(messages)  # type: ignore[arg-type]
                assert not isinstance(rendered, RenderedChat) and rendered == local.render_chat(messages)  # type: ignore[arg-type]
                assert exact.generate([rendered], PARAMS)[0].text == local.generate([rendered], PARAMS)[0].text
            finally:
                exact.close()
    finally:
        local.close()


def test_rendered_chat_is_a_string_that_remembers_its_messages() -> None:
    chat = RenderedChat([{"role": "user", "content": "hi"}])
    assert chat == "User: hi\n\nAssistant:" and chat.messages == ({"role": "user", "content": "hi"},)
    assert (chat + "") is chat and type(chat + " Hello") is str
    again = pickle.loads(pickle.dumps(chat))  # crosses process boundaries (Ray workers) intact
    assert isinstance(again, RenderedChat) and again.messages == chat.messages


def test_generated_logprobs_are_refused_with_the_reason() -> None:
    from terse.backend.openai import OpenAIBackend, OpenAIConfig
    from terse.errors import InvalidRequestError

    backend = OpenAIBackend(OpenAIConfig(base_url="http://127.0.0.1:9/v1", model="m"))
    try:
        with pytest.raises(InvalidRequestError, match="local: or hf: backend"):
            backend.submit("hi", SamplingParams(logprobs=2))
    finally:
        backend.close()
