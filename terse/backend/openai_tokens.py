"""How `OpenAIBackend` counts, encodes and decodes tokens without owning the model.

Three strategies behind one Protocol, picked in this order by `pick_tokenizer()`:

1. `LocalTokenizer`: a tokenizer given by path or hub name (`tokenizer=` option). Exact, offline, fast.
2. `ServerTokenizer`: the server's `/tokenize` and `/detokenize` endpoints (vLLM, SGLang and `terse serve`
   offer them at the server root, beside `/v1`). Exact, one round trip per call.
3. `ApproxTokenizer`: no tokenizer reachable. `count_tokens` estimates ceil(len(text) / 4) (the usual
   ~4 characters per token of English BPE vocabularies); `encode`/`decode` raise
   `UnsupportedOperationError` because ids cannot be guessed.

Without a local chat template, a chat is rendered as a `RenderedChat`: a readable transcript that keeps
its messages, so `OpenAIBackend` sends it to /v1/chat/completions and the server applies the model's
own template. `count_chat` counts such a chat exactly where the server can render it (`/tokenize` with
`messages`, as vLLM and `terse serve` accept).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import httpx

from terse.backend.types import Message
from terse.errors import TerseError, UnsupportedOperationError

TokenizerKind = Literal["local", "server", "approx"]

CHARS_PER_TOKEN = 4.0
"""The approximation's characters per token."""


class RemoteTokenizer(Protocol):
    """Token counting for a remote model. `encode` adds no special tokens (as `Backend.encode`)."""

    kind: TokenizerKind

    def count_tokens(self, text: str) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[Message]) -> str | None:
        """The model's chat template applied to `messages`, or None when this tokenizer has none."""
        ...

    def count_chat(self, messages: Sequence[Message]) -> int | None:
        """Tokens of `messages` under the model's chat template, or None when this strategy cannot tell."""
        ...


class LocalTokenizer:
    """A transformers tokenizer loaded from a path or hub name (offline)."""

    kind: TokenizerKind = "local"

    def __init__(self, path_or_name: str) -> None:
        from terse.backend.tokenization import load_tokenizer

        self._tokenizer = load_tokenizer(path_or_name)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=False))

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template source (None when it has none)."""
        template = getattr(self._tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def render_chat(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] = ()) -> str | None:
        """The chat template over `messages` (and `tools`, handed to the template as its `tools`)."""
        if not getattr(self._tokenizer, "chat_template", None):
            return None
        from terse.backend.tokenization import render_chat_template

        return render_chat_template(self._tokenizer, messages, tools)

    def count_chat(self, messages: Sequence[Message]) -> int | None:
        rendered = self.render_chat(messages)
        return None if rendered is None else self.count_tokens(rendered)


class ServerTokenizer:
    """The server's `/tokenize` + `/detokenize` endpoints (request shape of vLLM and `terse serve`)."""

    kind: TokenizerKind = "server"

    def __init__(self, post: Callable[[str, dict[str, Any]], dict[str, Any]], root_url: str, model: str):
        self._post = post
        self._root_url = root_url.rstrip("/")
        self._model = model

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        body = self._post(
            f"{self._root_url}/tokenize", {"model": self._model, "prompt": text, "add_special_tokens": False}
        )
        return [int(t) for t in body["tokens"]]

    def decode(self, token_ids: Sequence[int]) -> str:
        body = self._post(f"{self._root_url}/detokenize", {"model": self._model, "tokens": list(token_ids)})
        return str(body["prompt"])

    def render_chat(self, messages: Sequence[Message]) -> str | None:
        return None

    def count_chat(self, messages: Sequence[Message]) -> int | None:
        payload = {"model": self._model, "messages": [dict(m) for m in messages], "add_generation_prompt": True}
        try:
            body = self._post(f"{self._root_url}/tokenize", payload)
            return len(body["tokens"])
        except (httpx.HTTPError, TerseError, KeyError, ValueError, TypeError):
            return None  # a server whose /tokenize takes text only


class ApproxTokenizer:
    """No tokenizer: counts are estimates, ids are unavailable."""

    kind: TokenizerKind = "approx"

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def encode(self, text: str) -> list[int]:
        raise UnsupportedOperationError(
            "this OpenAI-compatible server offers no /tokenize endpoint and no local tokenizer was given; "
            "pass tokenizer='<path or hub name of the served model>' to encode text"
        )

    def decode(self, token_ids: Sequence[int]) -> str:
        raise UnsupportedOperationError(
            "no tokenizer available to decode ids; pass tokenizer='<path or hub name of the served model>'"
        )

    def render_chat(self, messages: Sequence[Message]) -> str | None:
        return None

    def count_chat(self, messages: Sequence[Message]) -> int | None:
        return None


class RenderedChat(str):
    """A chat rendered without the model's template: a "Role: content" transcript that keeps its messages.

    `OpenAIBackend.submit()` sends it to /v1/chat/completions, where the server applies the model's own
    template; the text is only what `count_tokens` estimates from (and what logs show). Adding "" keeps
    it a chat; adding text makes a plain string, which goes to /v1/completions as written.
    """

    messages: tuple[Message, ...]

    def __new__(cls, messages: Sequence[Message]) -> RenderedChat:
        chat = super().__new__(cls, plain_chat_transcript(messages))
        chat.messages = tuple(messages)
        return chat

    def __add__(self, other: str) -> str:
        return self if other == "" else str(self) + other

    def __reduce__(self) -> tuple[type[RenderedChat], tuple[tuple[Message, ...]]]:
        return (RenderedChat, (self.messages,))


def plain_chat_transcript(messages: Sequence[Message]) -> str:
    """Fallback chat rendering when no chat template is known: "Role: content" blocks, then "Assistant:"."""
    blocks = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*blocks, "Assistant:"])


def pick_tokenizer(
    tokenizer: str | None,
    *,
    probe_server: bool,
    post: Callable[[str, dict[str, Any]], dict[str, Any]],
    root_url: str,
    model: str,
) -> RemoteTokenizer:
    """The first strategy that works: local tokenizer, then the server's /tokenize, then the estimate."""
    if tokenizer is not None:
        return LocalTokenizer(tokenizer)
    if probe_server:
        server = ServerTokenizer(post, root_url, model)
        try:
            server.encode("probe")
        except (httpx.HTTPError, TerseError, KeyError, ValueError, TypeError):
            pass
        else:
            return server
    return ApproxTokenizer()
