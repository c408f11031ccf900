"""JSON schemas exercised by the structured-output tests: nested objects, arrays, enums, numbers,
required and optional properties, $defs, anyOf. Strings carry a maxLength (or a pattern / enum) so a
random model's output ends well within the token budget; the schema, not the model, bounds it."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "maxLength": 12}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "enum_and_bool": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "tag": NAME},
                "required": ["id", "tag"],
            },
            "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
        },
        "required": ["user", "score"],
    },
    "array": {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4}},
        "required": ["items"],
    },
    "optional": {
        "type": "object",
        "properties": {"title": NAME, "note": NAME, "count": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["title"],
    },
    "defs_anyof": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                             "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"]}},
        "type": "object",
        "properties": {
            "shape": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "string", "pattern": "^[a-z]{1,6}$"}]},
            "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3},
        },
        "required": ["shape", "points"],
    },
}

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
SUM_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                           "b": {"type": "integer", "minimum": -99, "maximum": 99}},
            "required": ["a", "b"],
        },
    },
}
