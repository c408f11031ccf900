"""What a structured-output request constrains its completion to: library-independent value types.

A `Constraint` travels whole inside `SamplingParams.constraint`; backends that decode locally compile it
to a token-level grammar (see `terse.backend.grammar`), the OpenAI-compatible backend turns it into the
server's request fields (`response_format`, `tools`, `structured_outputs`).

    RegexConstraint("[0-9]{3}")                 the whole completion matches the regex
    JsonSchemaConstraint.of({"type": ...})      a JSON value valid under the schema
    JsonObjectConstraint()                      any JSON object (OpenAI's "JSON mode")
    ChoiceConstraint(("yes", "no"))             exactly one of the strings
    GrammarConstraint("start: ...")             a Lark-syntax context-free grammar (llguidance dialect)
    ToolCallConstraint(tools, mode="required")  tool calls in the tool-call text format below

Tool-call text format (what a model writes when it calls functions; the server turns it into OpenAI
`tool_calls`). One block per call, blocks separated by a newline:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from terse.errors import InvalidRequestError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
CALL_HEADER = re.compile(r"\n?" + re.escape(TOOL_CALL_OPEN) + r'\{"name": "([A-Za-z0-9_.\-]+)", "arguments": ')
"""The start of one call block, up to its arguments (group 1: the function name)."""
CALL_TRAILER = "}" + TOOL_CALL_CLOSE
"""What follows a call's arguments object."""
_DECODER = json.JSONDecoder()


def _compact_json(value: Any, what: str) -> str:
    """Compact JSON text of a schema: hashable, so equal schemas share one compiled grammar. Key order is
    kept: the grammar writes an object's properties in the order the schema lists them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{what} must be a JSON object (a dict), got {type(value).__name__}")
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"{what} cannot be written as JSON: {e}") from e


@dataclass(frozen=True)
class RegexConstraint:
    """The completion is one full match of `pattern` (Rust `regex` syntax, anchored at both ends)."""

    pattern: str
    """The regular expression, e.g. r"\\d{3}-\\d{4}"."""

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise InvalidRequestError(f"regex={self.pattern!r} must be a non-empty string, e.g. r'[0-9]+'")


@dataclass(frozen=True)
class JsonSchemaConstraint:
    """The completion is a JSON value valid under a JSON Schema. Build with `JsonSchemaConstraint.of`."""

    schema_json: str
    """The schema as compact JSON text, so the constraint is hashable."""
    strict: bool = True
    """OpenAI's strict mode: objects accept only the properties they list (additionalProperties false
    unless the schema says otherwise). False follows JSON Schema's default (extra properties allowed)."""
    name: str = "response"
    """The schema's name (OpenAI's `json_schema.name`), used when forwarding to a server."""

    def __post_init__(self) -> None:
        if not isinstance(self.schema_json, str):
            raise InvalidRequestError(
                f"schema_json={self.schema_json!r} must be JSON text; build with JsonSchemaConstraint.of(schema)"
            )
        if not _FUNCTION_NAME.match(self.name):
            raise InvalidRequestError(f"json schema name={self.name!r} must match [A-Za-z0-9_.-]{{1,64}}")

    @classmethod
    def of(cls, schema: Mapping[str, Any] | str, *, strict: bool = True, name: str = "response") -> JsonSchemaConstraint:
        """From a schema dict (or its JSON text); raises `InvalidRequestError` when it is not a JSON object."""
        return cls(_compact_json(schema, "json_schema"), strict, name)

    @property
    def schema(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.schema_json)
        return loaded


@dataclass(frozen=True)
class JsonObjectConstraint:
    """The completion is one JSON object, of any shape (OpenAI `response_format={"type": "json_object"}`)."""


@dataclass(frozen=True)
class ChoiceConstraint:
    """The completion is exactly one of `choices`."""

    choices: tuple[str, ...]
    """The allowed completions (non-empty strings)."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.choices, str)
            or not isinstance(self.choices, tuple)
            or not self.choices
            or not all(isinstance(c, str) and c for c in self.choices)
        ):
            raise InvalidRequestError(
                f"choices={self.choices!r} must be a non-empty tuple of non-empty strings, e.g. ('yes', 'no')"
            )


@dataclass(frozen=True)
class GrammarConstraint:
    """The completion is derived from a Lark-syntax grammar (llguidance's dialect: `start:` rule,
    uppercase terminals, `%json {...}` for inline JSON schemas)."""

    lark: str
    """The grammar text, e.g. 'start: "yes" | "no"'."""

    def __post_init__(self) -> None:
        if not isinstance(self.lark, str) or "start" not in self.lark:
            raise InvalidRequestError("grammar must be Lark text with a 'start:' rule, e.g. 'start: \"a\" | \"b\"'")


@dataclass(frozen=True)
class ToolSpec:
    """One callable function, as in OpenAI's `tools[i].function`."""

    name: str
    """Function name ([A-Za-z0-9_.-], at most 64 characters)."""
    parameters_json: str
    """JSON Schema of the arguments object, as compact JSON text."""
    description: str = ""
    """What the function does (shown to the model)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _FUNCTION_NAME.match(self.name):
            raise InvalidRequestError(f"function name {self.name!r} must match [A-Za-z0-9_.-]{{1,64}}")

    @classmethod
    def of(cls, name: str, parameters: Mapping[str, Any] | None = None, description: str = "") -> ToolSpec:
        """From a parameters schema dict (None: a function without arguments)."""
        params = parameters if parameters is not None else {"type": "object", "properties": {}}
        return cls(name, _compact_json(params, f"function {name!r} parameters"), description)

    @property
    def parameters(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.parameters_json)
        return loaded


ToolMode = Literal["auto", "required"]


@dataclass(frozen=True)
class ToolCallConstraint:
    """The completion calls tools in the tool-call text format (see the module docstring).

    mode "auto": plain text (not starting with the tool-call tag) or one or more calls; "required": one or
    more calls. `function` names the one function that must be called (mode must be "required").
    Each call's arguments are valid under that function's parameters schema.
    """

    tools: tuple[ToolSpec, ...]
    """The functions the model may call."""
    mode: ToolMode = "auto"
    """"auto" (text or calls) or "required" (calls only)."""
    function: str | None = None
    """Force a call of this function (OpenAI's named tool_choice); only it may be called."""
    max_calls: int = 8
    """Most calls in one response (1 = OpenAI's parallel_tool_calls=false)."""

    def __post_init__(self) -> None:
        if not isinstance(self.tools, tuple) or not self.tools:
            raise InvalidRequestError("tools must be a non-empty tuple of ToolSpec")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise InvalidRequestError(f"tool names {names} must be unique")
        if self.mode not in ("auto", "required"):
            raise InvalidRequestError(f"tool mode={self.mode!r} must be 'auto' or 'required'")
        if not isinstance(self.max_calls, int) or self.max_calls < 1:
            raise InvalidRequestError(f"max_calls={self.max_calls!r} must be an int >= 1")
        if self.function is not None:
            if self.function not in names:
                raise InvalidRequestError(f"tool_choice names function {self.function!r}, not among tools {names}")
            if self.mode != "required":
                raise InvalidRequestError("a named function is always called: use mode='required' with function=")

    def tool(self, name: str) -> ToolSpec | None:
        return next((t for t in self.tools if t.name == name), None)


Constraint = (
    RegexConstraint
    | JsonSchemaConstraint
    | JsonObjectConstraint
    | ChoiceConstraint
    | GrammarConstraint
    | ToolCallConstraint
)
CONSTRAINT_TYPES = (
    RegexConstraint,
    JsonSchemaConstraint,
    JsonObjectConstraint,
    ChoiceConstraint,
    GrammarConstraint,
    ToolCallConstraint,
)


def call_header(name: str) -> str:
    """The text of a call block before its arguments object."""
    return f'{TOOL_CALL_OPEN}{{"name": "{name}", "arguments": '


def arguments_end(text: str, start: int) -> int | None:
    """End index of the JSON value starting at `start` (a call's arguments), None while it is incomplete."""
    try:
        _, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    return int(end)


def parse_tool_calls(text: str) -> list[tuple[str, str]] | None:
    """(function name, arguments JSON text) of each call of a text made only of call blocks (the
    tool-call text format); None when the text is something else (plain text, or cut short)."""
    calls: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        header = CALL_HEADER.match(text, pos)
        if header is None:
            return None
        end = arguments_end(text, header.end())
        if end is None or not text.startswith(CALL_TRAILER, end):
            return None
        calls.append((header.group(1), text[header.end() : end]))
        pos = end + len(CALL_TRAILER)
    return calls or None
