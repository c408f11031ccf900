"""Structured output over an OpenAI-compatible server: a `Constraint` as request fields, and tool calls
in a response written back as text in terse's tool-call format (so `Completion.text` carries them and
`terse.backend.constraints.parse_tool_calls` reads them the same way for every backend).

    JsonObjectConstraint  -> response_format {"type": "json_object"}
    JsonSchemaConstraint  -> response_format {"type": "json_schema", "json_schema": {name, schema, strict}}
    Regex / Choice / Grammar / non-strict schema -> structured_outputs {"regex" | "choice" | "grammar"}
                             (vLLM's extension, which `terse serve` reads too; OpenAI itself rejects it)
    ToolCallConstraint    -> tools + tool_choice (+ parallel_tool_calls false for one call)
"""

from __future__ import annotations

import json
from typing import Any

from terse.backend.constraints import (
    CALL_TRAILER,
    ChoiceConstraint,
    Constraint,
    GrammarConstraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    ToolCallConstraint,
    call_header,
)


def structured_payload(constraint: Constraint | None) -> dict[str, Any]:
    """The request fields that carry `constraint` (empty for None)."""
    if constraint is None:
        return {}
    if isinstance(constraint, JsonObjectConstraint):
        return {"response_format": {"type": "json_object"}}
    if isinstance(constraint, JsonSchemaConstraint):
        spec = {"name": constraint.name, "schema": constraint.schema, "strict": constraint.strict}
        return {"response_format": {"type": "json_schema", "json_schema": spec}}
    if isinstance(constraint, RegexConstraint):
        return {"structured_outputs": {"regex": constraint.pattern}}
    if isinstance(constraint, ChoiceConstraint):
        return {"structured_outputs": {"choice": list(constraint.choices)}}
    if isinstance(constraint, GrammarConstraint):
        return {"structured_outputs": {"grammar": constraint.lark}}
    return _tools_payload(constraint)


def _tools_payload(constraint: ToolCallConstraint) -> dict[str, Any]:
    tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}
        for t in constraint.tools
    ]
    choice: Any = constraint.mode
    if constraint.function is not None:
        choice = {"type": "function", "function": {"name": constraint.function}}
    payload: dict[str, Any] = {"tools": tools, "tool_choice": choice}
    if constraint.max_calls == 1:
        payload["parallel_tool_calls"] = False
    return payload


def message_text(message: dict[str, Any]) -> str:
    """A whole chat response's message as text: its content, or its tool calls as call blocks."""
    calls = message.get("tool_calls")
    if not calls:
        return str(message.get("content") or "")
    blocks = []
    for call in calls:
        fn = call.get("function") or {}
        raw = fn.get("arguments")
        arguments = raw if isinstance(raw, str) else json.dumps(raw if raw is not None else {})
        blocks.append(call_header(str(fn.get("name"))) + arguments + CALL_TRAILER)
    return "\n".join(blocks)


class ToolCallText:
    """Streamed chat deltas -> text pieces: content as is; tool-call deltas as call blocks (header when a
    call starts, argument pieces as they come, trailer when the next call starts or at `close()`)."""

    def __init__(self) -> None:
        self._open_call: int | None = None
        self._num_calls = 0

    def push(self, delta: dict[str, Any]) -> str:
        """The text of one `choices[i].delta` object."""
        out = str(delta.get("content") or "")
        for call in delta.get("tool_calls") or []:
            index, fn = call.get("index", 0), call.get("function") or {}
            if index != self._open_call:
                out += self.close() + ("\n" if self._num_calls else "")
                out += call_header(str(fn.get("name")))
                self._open_call = index
                self._num_calls += 1
            out += str(fn.get("arguments") or "")
        return out

    def close(self) -> str:
        """The trailer of the call still open, if any."""
        if self._open_call is None:
            return ""
        self._open_call = None
        return CALL_TRAILER
