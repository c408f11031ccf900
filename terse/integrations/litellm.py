"""terse in LiteLLM: `TerseHook`, a `CustomLogger` that compresses each chat request's messages before
LiteLLM sends it on.

Needs the `litellm` extra. The proxy calls `async_pre_call_hook`; the SDK (`litellm.completion`,
`litellm.acompletion` with the hook in `litellm.callbacks`) calls `async_pre_call_deployment_hook`; both
compress the same way, through `terse.compress.compress_messages` (its per-role policy: the system prompt
and the last user turn stay verbatim, long context turns are compressed for that question). Every other
field of the request, and of each message (names, tool calls), is left as sent; a message whose content is
not plain text (images) is never touched. Without a model unless `scorer` names one.

LiteLLM proxy: a module of yours holds the instance, and the config names it.

    # terse_callbacks.py
    from terse.integrations.litellm import TerseHook
    terse_hook = TerseHook(rate=0.5)

    # config.yaml
    litellm_settings:
      callbacks: terse_callbacks.terse_hook
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from terse.integrations.common import CompressionSettings, LazyCompressor, compress_chat

logger = logging.getLogger("terse.integrations.litellm")

CHAT_CALL_TYPES = frozenset({"completion", "acompletion"})
"""LiteLLM call types whose requests carry chat messages."""


class TerseHook(CustomLogger):
    """Compresses chat messages on their way through LiteLLM (see the module docstring)."""

    def __init__(
        self,
        rate: float | None = None,
        target_tokens: int | None = None,
        scorer: str | None = None,
        tokenizer: str | None = None,
        **kwargs: Any,
    ) -> None:
        """`rate` (fraction of the messages' tokens kept, 0.5 by default) or `target_tokens`; `scorer`: a
        backend spec for token-level pruning (None: no model); `tokenizer`: the Hugging Face tokenizer
        that counts tokens (None: the scorer's, else words). Other keyword arguments go to CustomLogger."""
        super().__init__(**kwargs)
        self.compressor = LazyCompressor(CompressionSettings.of(rate, target_tokens, scorer, tokenizer))

    def compress(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The compressed messages (blocking; the hooks run it in a worker thread)."""
        settings = self.compressor.settings
        return compress_chat(self.compressor.get(), settings.budget, messages)

    async def _rewrite(self, data: dict[str, Any], call_type: Any) -> dict[str, Any] | None:
        kind = getattr(call_type, "value", call_type)
        messages = data.get("messages")
        if kind not in CHAT_CALL_TYPES or not isinstance(messages, list) or not messages:
            return None
        compressed = await asyncio.to_thread(self.compress, messages)
        logger.debug("compressed %d messages to %d", len(messages), len(compressed))
        return {**data, "messages": compressed}

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        """LiteLLM proxy: the request body with its messages compressed (None leaves it as it is)."""
        return await self._rewrite(data, call_type)

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any] | None:
        """LiteLLM SDK: the call's keyword arguments with the messages compressed."""
        return await self._rewrite(kwargs, call_type)


__all__ = ["TerseHook"]
