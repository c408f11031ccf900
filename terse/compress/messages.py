"""`compress_messages`: compress a chat conversation's documents wherever they sit, keeping the chat intact.

Every message's text is split by `layouts.parse_layout` into documents and verbatim text (instructions,
the question, labels, tags, JSON structure). The documents of all messages are compressed together in
one question-aware call, conditioned on the last user turn's verbatim text (its question), and written
back in place. The conversation itself is never changed:

- every message keeps its role, its position and every field but `content` as the same objects
  (`tool_calls`, `tool_call_id`, `name`, unknown keys), so tool-call pairing survives;
- content given as a list of parts keeps its non-text parts; text parts are compressed;
- a message whose content compresses to nothing keeps `policy.placeholder`;
- JSON content (tool output) stays valid JSON; only its text fields shrink.

Which text is looked at: the system turn and the last user turn by their recognised layouts only (their
instructions and question stay verbatim); earlier turns and tool results by their layouts, else whole
(`compress_history`). A long message in which nothing is recognised stays verbatim and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from terse.backend.types import Role
from terse.compress.compressor import PromptCompressor
from terse.compress.config import Budget, ProtectionPolicy
from terse.compress.layouts import MIN_PASSAGE_CHARS, Layout, LayoutKind, parse_layout
from terse.compress.plan import TokenCounter
from terse.compress.result import CompressionResult
from terse.errors import ConfigError, InvalidRequestError

_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_INSTRUCTION_ROLES = ("system", "developer")
_MAX_CHARS_PER_TOKEN = 16  # no tokenizer averages more: a text this many times longer than N has >= N tokens
_FIT_ATTEMPTS = 3

Outcome = Literal["documents", "policy", "short", "unrecognised", "no_text"]
"""What happened to a message: its documents were compressed; kept by policy (role, tail); too short to be
worth it; long but no layout recognised (kept verbatim); no text content (e.g. only tool calls)."""


@dataclass(frozen=True)
class MessagePolicy:
    """Which messages are compressed and to what budget."""

    budget: Budget
    """A rate applies to the documents' tokens (the rest is kept on top); a target covers the content
    tokens of all messages, verbatim ones included (chat-template tokens not)."""
    keep_roles: tuple[Role, ...] = ()
    """Roles whose messages are never compressed ("system" covers "developer" too)."""
    keep_last_messages: int = 0
    """Keep this many final messages verbatim, whatever their role."""
    min_tokens: int = 32
    """Messages shorter than this many tokens are kept verbatim: not worth compressing."""
    compress_history: bool = True
    """Earlier turns and tool results with no recognised layout are compressed whole (they are material,
    not instructions); False leaves them verbatim."""
    question_from_last_user: bool = True
    """Condition the compression on the last user turn's verbatim text (its question)."""
    min_passage_chars: int = MIN_PASSAGE_CHARS
    """Shortest paragraph taken as a document outside an explicit container (see `layouts`)."""
    placeholder: str = "[omitted]"
    """Content of a message whose documents were all dropped and nothing else was left."""
    protect: ProtectionPolicy = field(default_factory=ProtectionPolicy)
    """Spans never cut inside compressed documents."""

    def __post_init__(self) -> None:
        bad = [r for r in self.keep_roles if r not in _ROLES]
        if bad or isinstance(self.keep_roles, str):
            raise ConfigError(f"keep_roles={self.keep_roles!r} must be a tuple of roles from {_ROLES}")
        for name in ("keep_last_messages", "min_tokens", "min_passage_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an int >= 0")
        if not isinstance(self.placeholder, str) or not self.placeholder.strip():
            raise ConfigError(f"placeholder={self.placeholder!r} must be a non-blank string, e.g. '[omitted]'")


@dataclass(frozen=True)
class MessageReport:
    """What happened to one message."""

    index: int
    """Position in the conversation."""
    role: str
    outcome: Outcome
    layout: LayoutKind
    """The layout its documents were found by ("none" when it had none)."""
    num_documents: int
    """Documents found in it."""
    num_document_tokens: int = 0
    """Tokens of its documents before compression (0 when not compressed)."""
    num_kept_tokens: int = 0
    """Tokens of its documents after compression."""


@dataclass(frozen=True)
class MessagesReport:
    """Per-message outcomes of one `compress_messages` call."""

    messages: tuple[MessageReport, ...]

    @property
    def num_documents(self) -> int:
        return sum(m.num_documents for m in self.messages)

    @property
    def compressed(self) -> tuple[int, ...]:
        """Indices of the messages whose documents were compressed."""
        return tuple(m.index for m in self.messages if m.outcome == "documents" and m.num_kept_tokens < m.num_document_tokens)

    @property
    def unrecognised(self) -> tuple[int, ...]:
        """Indices of long messages kept verbatim because no layout was recognised in them."""
        return tuple(m.index for m in self.messages if m.outcome == "unrecognised")


class CompressedMessages(NamedTuple):
    """The compressed conversation, the compression behind it and what happened to each message."""

    messages: list[dict[str, Any]]
    """A new list of new message dicts (same roles, same order, other fields the same objects); the
    input is not mutated."""
    result: CompressionResult | None
    """The compression of all documents: its context i is the i-th document in conversation order
    (its spans map into that document's text); None when nothing was compressed."""
    report: MessagesReport


@dataclass
class _Part:
    """One text of a message: its whole content (slot None) or one text part (slot = part index)."""

    slot: int | None
    text: str
    layout: Layout | None = None


def compress_messages(
    compressor: PromptCompressor, messages: Sequence[Mapping[str, Any]], policy: MessagePolicy
) -> CompressedMessages:
    """Compressed copy of `messages` under `policy`, using `compressor`'s stages and tokenizer.

    Raises `InvalidRequestError` naming the message when one is malformed, and when the verbatim text
    alone exceeds a `target_tokens` budget.
    """
    parts = [_text_parts(m, i) for i, m in enumerate(messages)]
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    count = compressor.count_tokens
    outcomes: list[Outcome] = [_locate(m, i, p, last_user, len(messages), policy, count) for i, (m, p) in enumerate(zip(messages, parts))]
    documents = [
        (i, k, d) for i, p in enumerate(parts) if outcomes[i] == "documents" for k, part in enumerate(p)
        if part.layout is not None for d in part.layout.documents
    ]
    if not documents:
        return CompressedMessages([dict(m) for m in messages], None, _report(messages, parts, outcomes, None, []))
    question = ""
    if policy.question_from_last_user and last_user >= 0:
        question = "\n".join(
            (part.layout.verbatim_text() if part.layout is not None else part.text) for part in parts[last_user]
        ).strip()
    contexts = [d.text for _, _, d in documents]
    budget = policy.budget
    fixed = 0
    if budget.target_tokens is not None:
        fixed = sum(count(t) for t in _verbatim_texts(parts, outcomes) if t)
        if fixed >= budget.target_tokens:
            raise InvalidRequestError(
                f"verbatim text takes {fixed} tokens, over the budget of {budget.target_tokens}; raise the budget or "
                f"keep less verbatim (keep_roles, keep_last_messages, min_tokens)"
            )
    room = None if budget.target_tokens is None else budget.target_tokens - fixed
    for _ in range(_FIT_ATTEMPTS):
        result = compressor.compress(
            contexts,
            budget=budget if room is None else Budget(target_tokens=room),
            protect=policy.protect,
            # conditioning only: the question stays where it is, so it is not part of the compressed text
            condition=question,
        )
        out = _render(messages, parts, outcomes, documents, result.contexts, policy.placeholder)
        if room is None or budget.target_tokens is None:
            break
        # the kept documents' markers, tags and separators, and seams between verbatim text and documents,
        # come on top of what the compressor measured: take the excess (and a little more) off the room
        over = _content_tokens(out, count) - budget.target_tokens
        if over <= 0 or room - over < 1:
            break
        room -= over + math.ceil(0.02 * room)
    return CompressedMessages(out, result, _report(messages, parts, outcomes, result, documents))


def _text_parts(message: Any, index: int) -> list[_Part]:
    """The texts of one message (validated), in order."""
    if not isinstance(message, Mapping) or message.get("role") not in _ROLES:
        role = message.get("role") if isinstance(message, Mapping) else None
        raise InvalidRequestError(
            f"messages[{index}] must be a mapping with 'role' one of {_ROLES}, got role {role!r}"
        )
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [_Part(None, content)]
    if isinstance(content, list):
        return [
            _Part(j, p["text"]) for j, p in enumerate(content)
            if isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
    raise InvalidRequestError(
        f"messages[{index}].content must be a string, a list of content parts or null, got {type(content).__name__}"
    )


def _locate(
    message: Mapping[str, Any], index: int, parts: list[_Part], last_user: int, num_messages: int,
    policy: MessagePolicy, count: TokenCounter,
) -> Outcome:
    """Decide what to do with one message; parses the layouts of those that are looked at."""
    role = message["role"]
    if not parts:
        return "no_text"
    kept = policy.keep_roles + (("developer",) if "system" in policy.keep_roles else ())
    if role in kept or index >= num_messages - policy.keep_last_messages:
        return "policy"
    chars = sum(len(p.text) for p in parts)
    if chars < _MAX_CHARS_PER_TOKEN * policy.min_tokens and sum(count(p.text) for p in parts if p.text) < policy.min_tokens:
        return "short"
    whole = policy.compress_history and role not in _INSTRUCTION_ROLES and index != last_user
    for part in parts:
        part.layout = parse_layout(part.text, whole_fallback=whole, min_passage_chars=policy.min_passage_chars)
    if any(p.layout is not None and p.layout.documents for p in parts):
        return "documents"
    # a text shorter than one passage holds no material worth reporting: an instruction, a question
    return "unrecognised" if chars >= policy.min_passage_chars else "short"


def _verbatim_texts(parts: Sequence[list[_Part]], outcomes: Sequence[Outcome]) -> list[str]:
    """Every text that is not a document or its unit: what stays whatever the compression drops."""
    return [
        part.layout.verbatim_text() if outcome == "documents" and part.layout is not None else part.text
        for p, outcome in zip(parts, outcomes) for part in p
    ]


def _render(
    messages: Sequence[Mapping[str, Any]], parts: Sequence[list[_Part]], outcomes: Sequence[Outcome],
    documents: Sequence[tuple[int, int, Any]], compressed: Sequence[str], placeholder: str,
) -> list[dict[str, Any]]:
    texts: dict[tuple[int, int], list[str]] = {}
    for (i, k, _), text in zip(documents, compressed):
        texts.setdefault((i, k), []).append(text)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        message = dict(m)
        if outcomes[i] == "documents":
            new = {
                part.slot: part.layout.render(texts[(i, k)]) if part.layout is not None and (i, k) in texts else part.text
                for k, part in enumerate(parts[i])
            }
            message["content"] = _with_texts(m["content"], new, placeholder)
        out.append(message)
    return out


def _with_texts(content: Any, new: dict[int | None, str], placeholder: str) -> Any:
    """The content with its texts replaced; emptied text parts are left out, and an emptied message
    keeps the placeholder rather than disappearing (the role sequence must not change)."""
    if isinstance(content, str):
        text = new[None]
        return text if text.strip() else placeholder
    parts: list[Any] = []
    for j, part in enumerate(content):
        if j not in new:
            parts.append(part)
        elif new[j].strip():
            parts.append({**part, "text": new[j]} if new[j] != part["text"] else part)
    return parts or [{"type": "text", "text": placeholder}]


def _content_tokens(messages: Sequence[Mapping[str, Any]], count: TokenCounter) -> int:
    total = 0
    for i, m in enumerate(messages):
        for part in _text_parts(m, i):
            total += count(part.text) if part.text else 0
    return total


def _report(
    messages: Sequence[Mapping[str, Any]], parts: Sequence[list[_Part]], outcomes: Sequence[Outcome],
    result: CompressionResult | None, documents: Sequence[tuple[int, int, Any]],
) -> MessagesReport:
    original: dict[int, int] = {}
    kept: dict[int, int] = {}
    if result is not None:
        for (i, _, _), report in zip(documents, result.reports):
            original[i] = original.get(i, 0) + report.num_original_tokens
            kept[i] = kept.get(i, 0) + report.num_kept_tokens
    reports = []
    for i, (m, p, outcome) in enumerate(zip(messages, parts, outcomes)):
        layouts = [part.layout for part in p if part.layout is not None and part.layout.documents]
        reports.append(MessageReport(
            index=i, role=str(m["role"]), outcome=outcome, layout=layouts[0].kind if layouts else "none",
            num_documents=sum(len(layout.documents) for layout in layouts),
            num_document_tokens=original.get(i, 0), num_kept_tokens=kept.get(i, 0),
        ))
    return MessagesReport(tuple(reports))


__all__ = ["CompressedMessages", "MessagePolicy", "MessageReport", "MessagesReport", "compress_messages"]
