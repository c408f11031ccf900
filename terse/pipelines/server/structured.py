"""Structured output in engine mode: `response_format`, `tools` / `tool_choice` and `structured_outputs`
parsed into one `Constraint`, plus the tool prompt the model reads.

    response_format {"type": "json_object"}                      -> JsonObjectConstraint
    response_format {"type": "json_schema", "json_schema": {...}} -> JsonSchemaConstraint (strict by default)
    structured_outputs {"regex" | "choice" | "grammar" | "json"} -> Regex / Choice / Grammar / JsonSchema
        (vLLM's extension field; lets the openai: backend carry every constraint kind to this server)
    tools + tool_choice "auto" | "required" | {"type": "function", "function": {"name": ...}}
                                                                  -> ToolCallConstraint; "none" -> no tools

Every problem is a 400 naming the field: a schema is compiled (without a tokenizer) while the request is
parsed, so "Invalid type: strin" reaches the client with `param` pointing at the schema. Tools are shown
to the model in a system message; earlier assistant tool calls and tool results are written into the
transcript in the same tool-call text format the grammar enforces (see terse.backend.constraints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from terse.backend.constraints import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ChoiceConstraint,
    Constraint,
    GrammarConstraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    ToolCallConstraint,
    ToolSpec,
)
from terse.backend.grammar import JSON_OPTIONS, grammar_text
from terse.backend.types import Message, SamplingParams
from terse.errors import InvalidRequestError
from terse.pipelines.server.errors import ApiError, invalid

STRUCTURED_FIELDS = ("response_format", "tools", "tool_choice", "parallel_tool_calls", "structured_outputs")
"""Request fields this module reads (for the list of parameters the server knows)."""


@dataclass(frozen=True)
class StructuredRequest:
    """What a request asks for beyond free text."""

    constraint: Constraint | None
    """The grammar the completion must follow (None: free text)."""
    tools: ToolCallConstraint | None = None
    """The callable tools when tool calls are possible (tool_choice other than "none")."""


def _check(constraint: Constraint, param: str) -> Constraint:
    """Compile without a tokenizer: a 400 naming `param` for an invalid regex, schema or grammar."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar_text(constraint))
    if is_error:
        raise invalid(f"'{param}' is invalid: {messages[0].strip()}", param, "invalid_schema")
    return constraint


def _response_format(raw: Any) -> Constraint | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or raw.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid(
            f"'response_format' must be {{'type': 'text' | 'json_object' | 'json_schema', ...}}, got {raw!r}",
            "response_format",
            "invalid_type",
        )
    if raw["type"] == "text":
        return None
    if raw["type"] == "json_object":
        return JsonObjectConstraint()
    spec = raw.get("json_schema")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
        raise invalid(
            "'response_format.json_schema' must be {'name': ..., 'schema': {...}, 'strict': true}",
            "response_format.json_schema",
            "invalid_type",
        )
    strict = spec.get("strict")
    try:
        constraint = JsonSchemaConstraint.of(
            spec["schema"], strict=strict is not False, name=str(spec.get("name") or "response")
        )
    except InvalidRequestError as e:
        raise invalid(str(e), "response_format.json_schema") from e
    return _check(constraint, "response_format.json_schema.schema")


def _structured_outputs(raw: Any) -> Constraint | None:
    """vLLM's `structured_outputs` extension: exactly one of regex / choice / grammar / json."""
    if raw is None:
        return None
    kinds = [k for k in ("regex", "choice", "grammar", "json") if isinstance(raw, Mapping) and raw.get(k) is not None]
    if len(kinds) != 1:
        raise invalid(
            "'structured_outputs' must hold exactly one of 'regex', 'choice', 'grammar', 'json'",
            "structured_outputs",
            "invalid_type",
        )
    kind, value = kinds[0], raw[kinds[0]]
    param = f"structured_outputs.{kind}"
    try:
        if kind == "regex":
            constraint: Constraint = RegexConstraint(value)
        elif kind == "choice":
            constraint = ChoiceConstraint(tuple(value) if isinstance(value, list) else value)
        elif kind == "grammar":
            constraint = GrammarConstraint(value)
        else:
            constraint = JsonSchemaConstraint.of(value, strict=False)
    except InvalidRequestError as e:
        raise invalid(str(e), param) from e
    return _check(constraint, param)


def _tool_specs(raw: Any) -> tuple[ToolSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise invalid("'tools' must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    specs = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, Mapping) and tool.get("type") == "function" else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise invalid(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}}",
                f"tools[{i}]",
                "invalid_type",
            )
        try:
            spec = ToolSpec.of(fn["name"], fn.get("parameters"), str(fn.get("description") or ""))
        except InvalidRequestError as e:
            raise invalid(str(e), f"tools[{i}].function") from e
        _check(JsonSchemaConstraint.of(spec.parameters_json), f"tools[{i}].function.parameters")
        specs.append(spec)
    return tuple(specs)


def _tools(body: Mapping[str, Any]) -> ToolCallConstraint | None:
    raw_tools, choice = body.get("tools"), body.get("tool_choice")
    if raw_tools is None:
        if choice not in (None, "none"):
            raise invalid(f"'tool_choice'={choice!r} needs 'tools'", "tool_choice")
        return None
    specs = _tool_specs(raw_tools)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid(f"'parallel_tool_calls' must be a boolean, got {parallel!r}", "parallel_tool_calls", "invalid_type")
    max_calls = 1 if parallel is False else ToolCallConstraint.max_calls
    try:
        if choice in (None, "auto"):
            return ToolCallConstraint(specs, "auto", max_calls=max_calls)
        if choice == "none":
            return None
        if choice == "required":
            return ToolCallConstraint(specs, "required", max_calls=max_calls)
        name = choice.get("function", {}).get("name") if isinstance(choice, Mapping) else None
        if not isinstance(name, str):
            raise invalid(
                f"'tool_choice' must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                f"{{'name': ...}}}}, got {choice!r}",
                "tool_choice",
            )
        return ToolCallConstraint(specs, "required", name, max_calls=1)
    except InvalidRequestError as e:
        raise invalid(str(e), "tool_choice") from e


def parse_structured(body: Mapping[str, Any], *, chat: bool = True) -> StructuredRequest | None:
    """The structured-output part of a request body (None when it asks for none); `ApiError` 400s."""
    if not any(body.get(f) is not None for f in STRUCTURED_FIELDS):
        return None
    if not chat and (body.get("tools") is not None or body.get("tool_choice") is not None):
        raise invalid("'tools' belong to /v1/chat/completions, not /v1/completions", "tools")
    tools = _tools(body) if chat else None
    constraint = _response_format(body.get("response_format"))
    extension = _structured_outputs(body.get("structured_outputs"))
    if constraint is not None and extension is not None:
        raise invalid("give either 'response_format' or 'structured_outputs', not both", "structured_outputs")
    constraint = constraint or extension
    if tools is not None:
        if constraint is not None:
            raise ApiError(
                400,
                "a response_format / structured_outputs constraint together with tools is not supported; "
                "use tool_choice='none' or drop the response_format",
                param="response_format",
                code="unsupported_combination",
            )
        constraint = _check(tools, "tools")
    return StructuredRequest(constraint, tools)


def constrained(params: SamplingParams, structured: StructuredRequest | None) -> SamplingParams:
    """`params` carrying the request's constraint."""
    if structured is None or structured.constraint is None:
        return params
    try:
        return dataclasses.replace(params, constraint=structured.constraint)
    except InvalidRequestError as e:
        raise invalid(str(e), "ignore_eos") from e


# -- the prompt ------------------------------------------------------------------------------------------
def tool_prompt(tools: ToolCallConstraint) -> str:
    """The system text that shows the model its functions and the call format."""
    listed = [tools.tool(tools.function)] if tools.function else list(tools.tools)
    lines = ["You can call these functions (JSON schemas of their arguments):"]
    for t in listed:
        if t is not None:
            entry = {"name": t.name, "description": t.description, "parameters": t.parameters}
            lines.append(json.dumps(entry, ensure_ascii=False))
    lines.append(
        f'To call a function, reply with {TOOL_CALL_OPEN}{{"name": <function name>, "arguments": <arguments '
        f"object>}}{TOOL_CALL_CLOSE}, one call per line."
    )
    if tools.mode == "auto":
        lines.append("Or answer in plain text when no call is needed.")
    return "\n".join(lines)


def call_block(name: str, arguments: Any) -> str:
    """One call in the tool-call text format, laid out as the grammar lays it out."""
    sep = (JSON_OPTIONS["item_separator"], JSON_OPTIONS["key_separator"])
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, separators=sep, ensure_ascii=False) + (
        TOOL_CALL_CLOSE
    )


def _history_content(message: Message, raw: Any) -> str:
    """An earlier assistant message's text with its tool calls written out as call blocks."""
    calls = raw.get("tool_calls") if isinstance(raw, Mapping) else None
    if message["role"] != "assistant" or not isinstance(calls, list) or not calls:
        return message["content"]
    blocks = []
    for call in calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            continue
        arguments: Any = fn.get("arguments") or "{}"
        with contextlib.suppress(json.JSONDecodeError):  # else replay what the client sent, as text
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        blocks.append(call_block(str(fn.get("name")), arguments))
    text = "\n".join(blocks)
    return f"{message['content']}\n{text}" if message["content"] else text


def calls_written_out(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Text messages from wire-form ones (`ChatRequest.prompt_messages`), each assistant message's tool
    calls written into its content as call blocks: the transcript a model without a tool-aware chat
    template reads (this server's own engine renders them so)."""
    out: list[Message] = []
    for m in messages:
        text: Message = {"role": m["role"], "content": str(m.get("content") or "")}
        out.append({"role": text["role"], "content": _history_content(text, m)})
    return out


def prompt_messages(
    messages: Sequence[Message], raw_messages: Any, structured: StructuredRequest | None
) -> list[Message]:
    """The messages the model reads: tool calls of earlier turns written out, the tool prompt added to
    (or placed as) the system message. `raw_messages` is the request body's list, index-aligned with
    `messages` when no hook changed their number."""
    out = [dict(m) for m in messages]
    if isinstance(raw_messages, list) and len(raw_messages) == len(out):
        for m, raw in zip(out, raw_messages):
            m["content"] = _history_content(m, raw)  # type: ignore[arg-type, typeddict-item]
    typed: list[Message] = out  # type: ignore[assignment]
    if structured is None or structured.tools is None:
        return typed
    text = tool_prompt(structured.tools)
    if typed and typed[0]["role"] == "system":
        typed[0] = {"role": "system", "content": f"{typed[0]['content']}\n\n{text}"}
        return typed
    return [{"role": "system", "content": text}, *typed]
