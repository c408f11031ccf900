"""`compress_messages`: compress a chat conversation with a per-role policy, returning messages.

The system prompt, the last user turn and the last few turns stay verbatim (by default); long
history and context turns are compressed together, conditioned on the last user turn as the
question, with their order kept. A turn compressed to nothing is left out of the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from terse.backend.types import Message, Role
from terse.compress.compressor import PromptCompressor
from terse.compress.config import Budget, ProtectionPolicy
from terse.compress.result import CompressionResult
from terse.errors import ConfigError, InvalidRequestError

_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class MessagePolicy:
    """Which messages are compressed and to what budget."""

    budget: Budget
    """Budget over the content tokens of all messages (verbatim ones included; template tokens not)."""
    keep_roles: tuple[Role, ...] = ("system",)
    """Roles whose messages are never compressed."""
    keep_last_user: bool = True
    """Keep the last user message verbatim (it is usually the question)."""
    keep_last_messages: int = 0
    """Keep this many final messages verbatim, whatever their role."""
    min_tokens: int = 32
    """Messages shorter than this many tokens are kept verbatim: not worth compressing."""
    question_from_last_user: bool = True
    """Condition the compression on the last user message."""
    protect: ProtectionPolicy = field(default_factory=ProtectionPolicy)
    """Spans never cut inside compressed messages."""

    def __post_init__(self) -> None:
        bad = [r for r in self.keep_roles if r not in _ROLES]
        if bad or isinstance(self.keep_roles, str):
            raise ConfigError(f"keep_roles={self.keep_roles!r} must be a tuple of roles from {_ROLES}")
        for name in ("keep_last_messages", "min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an int >= 0")


class CompressedMessages(NamedTuple):
    """The compressed conversation and the compression behind it."""

    messages: list[Message]
    """A new list; the input is not mutated. Turns compressed to nothing are left out."""
    result: CompressionResult | None
    """The compression of the compressible turns: its context i is the i-th compressible message, in
    conversation order (its spans map into those messages); None when everything already fit."""


def compress_messages(
    compressor: PromptCompressor, messages: Sequence[Message], policy: MessagePolicy
) -> CompressedMessages:
    """Compressed copy of `messages` under `policy`, using `compressor`'s stages and tokenizer.

    Raises `InvalidRequestError` when the verbatim messages alone exceed the budget.
    """
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise InvalidRequestError(
                f"messages[{i}]={m!r} must be {{'role': one of {_ROLES}, 'content': str}}"
            )
    count = compressor.count_tokens
    sizes = [count(m["content"]) if m["content"] else 0 for m in messages]
    keep = _verbatim(messages, sizes, policy)
    num_total = sum(sizes)
    num_fixed = sum(s for s, k in zip(sizes, keep) if k)
    target = policy.budget.resolve(num_total, num_fixed)
    movable = [i for i, k in enumerate(keep) if not k]
    if target >= num_total or not movable:
        return CompressedMessages([Message(role=m["role"], content=m["content"]) for m in messages], None)
    if num_fixed >= target:
        raise InvalidRequestError(
            f"verbatim messages take {num_fixed} tokens, over the budget of {target}; raise the budget or "
            f"keep fewer messages verbatim (keep_roles, keep_last_messages, keep_last_user)"
        )
    question = ""
    if policy.question_from_last_user:
        users = [m["content"] for m in messages if m["role"] == "user"]
        question = users[-1] if users else ""
    ordered = replace(compressor.config, reorder="original")
    worker = compressor if ordered == compressor.config else compressor.with_config(ordered)
    result = worker.compress(
        [messages[i]["content"] for i in movable],
        budget=Budget(target_tokens=target - num_fixed),
        protect=policy.protect,
        # conditioning only: the question is not part of the compressed text, so it is not passed as
        # `question` (which would be prepended to the budgeted prompt) but through the stages' env
        condition=question,
    )
    compressed = dict(zip(movable, result.contexts))
    out: list[Message] = []
    for i, m in enumerate(messages):
        content = compressed.get(i, m["content"])
        if i in compressed and not content:
            continue
        out.append({"role": m["role"], "content": content})
    return CompressedMessages(out, result)


def _verbatim(messages: Sequence[Message], sizes: Sequence[int], policy: MessagePolicy) -> list[bool]:
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    first_kept_tail = len(messages) - policy.keep_last_messages
    return [
        m["role"] in policy.keep_roles
        or (policy.keep_last_user and i == last_user)
        or i >= first_kept_tail
        or sizes[i] < policy.min_tokens
        for i, m in enumerate(messages)
    ]
