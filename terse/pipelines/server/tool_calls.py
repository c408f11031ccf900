"""Model text in the tool-call format -> OpenAI `tool_calls`, whole (`chat_message`) or streamed
(`ChatDeltas`).

The grammar (terse.backend.grammar.tool_call_lark) lays every call out the same way:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\\n<tool_call>...
    ^ header ---------------------------------------^ arguments ----^ ^ trailer --^

so a stream can announce a call as soon as its header is complete and pass the arguments on as they are
generated: they are exactly the characters between the header and the arguments object's closing brace
(found by decoding the JSON, so a "}</tool_call>" inside a string value is never mistaken for the end).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from terse.backend.constraints import (
    CALL_HEADER,
    CALL_TRAILER,
    TOOL_CALL_OPEN,
    arguments_end,
    parse_tool_calls,
)
from terse.pipelines.server.structured import StructuredRequest


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: `arguments` is the JSON text exactly as generated."""

    id: str
    name: str
    arguments: str

    def body(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def chat_message(text: str, structured: StructuredRequest | None) -> tuple[dict[str, Any], bool]:
    """The assistant message of a whole response, and whether it holds tool calls."""
    calls = parse_tool_calls(text) if structured is not None and structured.tools is not None else None
    if calls is None:  # plain text, or calls cut short (no closing plan): the text as it came
        return {"role": "assistant", "content": text}, False
    bodies = [ToolCall(new_call_id(), name, arguments).body() for name, arguments in calls]
    return {"role": "assistant", "content": None, "tool_calls": bodies}, True


def finish_reason(reason: str, has_calls: bool) -> str:
    """OpenAI's finish reason: "tool_calls" when a finished response called tools."""
    return "tool_calls" if has_calls and reason == "stop" else reason


class ChatDeltas:
    """Turns one choice's text deltas into chat-chunk `delta` objects (content, or tool_calls when the
    request has tools and the model called them). Not thread-safe: one per streamed choice."""

    def __init__(self, structured: StructuredRequest | None) -> None:
        self._tools = structured is not None and structured.tools is not None
        self._text = ""
        self._mode = "undecided" if self._tools else "text"
        self._num_sent = 0  # text mode: characters sent as content
        self._pos = 0  # calls mode: where the next call block starts
        self._args_start: int | None = None  # calls mode: start of the current call's arguments
        self._num_args_sent = 0
        self.num_calls = 0

    @property
    def has_calls(self) -> bool:
        return self.num_calls > 0

    def push(self, delta: str) -> list[dict[str, Any]]:
        self._text += delta
        if self._mode == "undecided":
            if self._text.startswith(TOOL_CALL_OPEN):
                self._mode = "calls"
            elif TOOL_CALL_OPEN.startswith(self._text):
                return []  # could still become a call
            else:
                self._mode = "text"
        return self._content() if self._mode == "text" else self._calls()

    def finish(self) -> list[dict[str, Any]]:
        """Whatever is still held back (text that looked like the start of a call)."""
        return self._content() if self._mode in ("text", "undecided") else []

    def _content(self) -> list[dict[str, Any]]:
        piece = self._text[self._num_sent :]
        self._num_sent = len(self._text)
        return [{"content": piece}] if piece else []

    def _calls(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            if self._args_start is None:
                header = CALL_HEADER.match(self._text, self._pos)
                if header is None:
                    return out
                self._args_start, self._num_args_sent = header.end(), 0
                call = ToolCall(new_call_id(), header.group(1), "")
                out.append({"tool_calls": [call.body(self.num_calls)]})
                self.num_calls += 1
            end = arguments_end(self._text, self._args_start)
            stop = end if end is not None else len(self._text)
            piece = self._text[self._args_start + self._num_args_sent : stop]
            if piece:
                self._num_args_sent += len(piece)
                out.append({"tool_calls": [{"index": self.num_calls - 1, "function": {"arguments": piece}}]})
            if end is None or not self._text.startswith(CALL_TRAILER, end):
                return out
            self._pos, self._args_start = end + len(CALL_TRAILER), None
