"""Request bodies as JSON values the handlers can trust: every malformed body is a 400 that says why.

`parse_json_body` rejects, each with code "invalid_json":
- bytes that are not UTF-8 JSON (including numbers too long for Python's int parser);
- values nested deeper than `MAX_DEPTH` (Python's parser, and later `json.dumps` when proxying, would
  hit the recursion limit and fail with a 500);
- strings or keys holding a lone UTF-16 surrogate (`"\\ud800x"`: valid JSON escape syntax, but no
  Unicode text, so no tokenizer or upstream can encode it). Escaped pairs (`"\\ud83d\\ude00"`) are one
  character and are fine.

The walk that checks depth and surrogates runs only when the raw bytes could hold either (more
brackets than `MAX_DEPTH`, or a `\\uD800`-`\\uDFFF` escape), so ordinary bodies cost one `json.loads`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from terse.pipelines.server.errors import ApiError, invalid

MAX_DEPTH = 128
"""Deepest nesting of objects and arrays accepted (tool schemas need a few dozen levels at most)."""

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def parse_json_body(raw: bytes) -> Any:
    """The JSON value of a request body; `ApiError` (400, "invalid_json") for anything malformed."""
    try:
        value = json.loads(raw)
    except RecursionError as e:
        raise _too_deep() from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, over-long integer literals
        raise invalid(f"the request body is not valid JSON: {e}", None, "invalid_json") from e
    check_strings = _SURROGATE_ESCAPE.search(raw) is not None
    if check_strings or raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        _check_tree(value, check_strings)
    return value


def _check_tree(value: Any, check_strings: bool) -> None:
    """Depth and (when `check_strings`) lone surrogates, iteratively: no recursion on hostile input."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, dict):
            if depth >= MAX_DEPTH:
                raise _too_deep()
            for key, child in node.items():
                child_path = f"{path}.{key}" if path else str(key)
                if check_strings:
                    _check_text(key, f"a key in {path or 'the body'}", path or None)
                stack.append((child, child_path, depth + 1))
        elif isinstance(node, list):
            if depth >= MAX_DEPTH:
                raise _too_deep()
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(node))
        elif check_strings and isinstance(node, str):
            _check_text(node, f"'{path}'" if path else "the body", path or None)


def _check_text(text: str, where: str, param: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid(
            f"{where} holds a lone UTF-16 surrogate ({text[e.start]!r} at character {e.start}), which is not "
            f"Unicode text; send valid UTF-8 (an escaped pair such as \\ud83d\\ude00 is fine)",
            param,
            "invalid_json",
        ) from e


def _too_deep() -> ApiError:
    return invalid(
        f"the request body nests objects/arrays more than {MAX_DEPTH} levels deep; flatten it",
        None,
        "invalid_json",
    )
