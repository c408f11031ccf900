"""terse inside LiteLLM: `litellm.completion` against `terse serve`, and `TerseHook` as the proxy loads and
calls it (config instance, `async_pre_call_hook`) and as the SDK calls it (`litellm.acompletion`)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest
from litellm.caching.dual_cache import DualCache
from litellm.proxy._types import UserAPIKeyAuth
from litellm.proxy.types_utils.utils import get_instance_fn

from terse.integrations.litellm import TerseHook
from tests.integrations.conftest import DOCS, QUESTION

LONG_CONTEXT = "\n\n".join(DOCS.values())
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Answer from the documents."},
    {"role": "user", "content": f"Documents:\n\n{LONG_CONTEXT}", "name": "reader"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": LONG_CONTEXT},
    {"role": "user", "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]},
    {"role": "user", "content": QUESTION},
]


@pytest.fixture
def callbacks() -> Iterator[list[Any]]:
    saved = list(litellm.callbacks)
    yield litellm.callbacks
    litellm.callbacks[:] = saved


def test_litellm_completion_against_terse_serve(terse_server: tuple[str, str, str]) -> None:
    url, model, _ = terse_server
    args: dict[str, Any] = {"model": f"openai/{model}", "api_base": f"{url}/v1", "api_key": "unused",
                            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6, "temperature": 0}
    whole = litellm.completion(**args)
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(**args, stream=True))
    assert streamed == whole.choices[0].message.content and whole.usage.completion_tokens > 0


def test_proxy_loads_the_hook_from_config_and_it_compresses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "terse_callbacks.py").write_text("from terse.integrations.litellm import TerseHook\n"
                                                 "terse_hook = TerseHook(rate=0.3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hook = get_instance_fn("terse_callbacks.terse_hook", config_file_path=str(tmp_path / "config.yaml"))
    assert isinstance(hook, TerseHook)
    data = {"model": "gpt-x", "messages": CONVERSATION, "temperature": 0, "metadata": {"team": "a"}}
    out = asyncio.run(hook.async_pre_call_hook(
        user_api_key_dict=UserAPIKeyAuth(), cache=DualCache(), data=data, call_type="completion"
    ))
    assert out is not None and {k: v for k, v in out.items() if k != "messages"} == {
        k: v for k, v in data.items() if k != "messages"}
    messages = out["messages"]
    assert messages[0] == CONVERSATION[0] and messages[-1] == CONVERSATION[-1]  # system and question verbatim
    assert CONVERSATION[2] in messages and CONVERSATION[4] in messages  # tool calls and image turns untouched
    texts = [m for m in messages if isinstance(m.get("content"), str) and m not in (messages[0], messages[-1])]
    assert sum(len(m["content"]) for m in texts) < 0.5 * 2 * len(LONG_CONTEXT)
    assert "Acme Corp" in " ".join(m["content"] for m in texts)
    for m in texts:  # a compressed turn keeps its other fields
        assert m.get("name") == "reader" if m["role"] == "user" else m["tool_call_id"] == "c1"
    assert data["messages"] is CONVERSATION  # the request given is not mutated
    skipped = asyncio.run(hook.async_pre_call_hook(
        user_api_key_dict=UserAPIKeyAuth(), cache=DualCache(), data={"input": ["x"]}, call_type="embeddings"
    ))
    assert skipped is None
    sys.modules.pop("terse_callbacks", None)


def test_sdk_acompletion_sends_the_compressed_conversation(terse_server: tuple[str, str, str], callbacks: list[Any]) -> None:
    url, model, _ = terse_server
    messages = [{"role": "user", "content": f"Documents:\n\n{LONG_CONTEXT}"}, {"role": "user", "content": QUESTION}]
    args: dict[str, Any] = {"model": f"openai/{model}", "api_base": f"{url}/v1", "api_key": "unused",
                            "messages": messages, "max_tokens": 2, "temperature": 0}
    plain = asyncio.run(litellm.acompletion(**args))
    callbacks.append(TerseHook(rate=0.3))
    compressed = asyncio.run(litellm.acompletion(**args))
    assert compressed.usage.prompt_tokens < 0.6 * plain.usage.prompt_tokens  # the server saw the shorter prompt
