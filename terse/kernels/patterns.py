"""Per-head sparse prefill patterns: dataclasses, JSON load/save/validate, and a default.

A model's patterns are one `HeadPattern` per (layer, query head), found offline by
`terse.pipelines.pattern_search` (`terse sparse-patterns`) on a sample prompt and saved as JSON beside the model, e.g.

    {"format": "terse.sparse_patterns/1", "model_name": "...", "num_layers": 2, "num_q_heads": 4,
     "layers": [[{"kind": "vertical_slash", "num_vertical": 1024, "num_slash": 256, "target_mass": 0.95},
                 {"kind": "a_shape", "num_sink_tokens": 64, "window_len": 2048}, ...], ...]}

Each pattern kind is a frozen dataclass registered in PATTERN_KINDS; `terse.kernels.prefill` maps a
kind to the estimator + kernel that run it. Without a file, `default_patterns` gives every head the
vertical-slash pattern with default budgets (the most general of the dynamic patterns).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

from terse.errors import ConfigError
from terse.validation import check_int, check_range

FORMAT = "terse.sparse_patterns/1"


class HeadPattern(Protocol):
    """A head's pattern: `kind` names it in JSON and in the prefill registry."""

    kind: ClassVar[str]


@dataclass(frozen=True)
class DensePattern:
    """Dense causal attention (heads whose mass is spread too widely to skip anything)."""

    kind: ClassVar[str] = "dense"


@dataclass(frozen=True)
class AShapePattern:
    """Static sinks + local window, the same for every input."""

    kind: ClassVar[str] = "a_shape"
    num_sink_tokens: int = 64
    """First tokens every query sees."""
    window_len: int = 2048
    """Most recent tokens (itself included) every query sees."""

    def __post_init__(self) -> None:
        check_int("a_shape num_sink_tokens", self.num_sink_tokens, low=0, example=64)
        check_int("a_shape window_len", self.window_len, low=1, example=2048)


@dataclass(frozen=True)
class VerticalSlashPattern:
    """Key columns + diagonals chosen per input from the last queries' attention."""

    kind: ClassVar[str] = "vertical_slash"
    num_vertical: int = 1024
    """Most key columns kept (sinks included)."""
    num_slash: int = 256
    """Most diagonals kept (local diagonals included)."""
    target_mass: float = 0.95
    """Stop adding columns/diagonals once their estimated mass reaches this share (1.0: the caps decide)."""

    def __post_init__(self) -> None:
        check_int("vertical_slash num_vertical", self.num_vertical, low=1, example=1024)
        check_int("vertical_slash num_slash", self.num_slash, low=1, example=256)
        check_range("target_mass", self.target_mass, 0.0, 1.0, low_open=True, example="1.0 (the caps decide)")


@dataclass(frozen=True)
class BlockSparsePattern:
    """Key blocks per query block chosen per input from mean-pooled block scores."""

    kind: ClassVar[str] = "block_sparse"
    num_blocks: int = 64
    """Most key blocks per query block (sink and diagonal blocks included)."""
    target_mass: float = 0.95
    """Stop adding blocks once their estimated mass reaches this share (1.0: the cap decides)."""

    def __post_init__(self) -> None:
        check_int("block_sparse num_blocks", self.num_blocks, low=1, example=64)
        check_range("target_mass", self.target_mass, 0.0, 1.0, low_open=True, example="1.0 (the cap decides)")


PATTERN_KINDS: dict[str, type[Any]] = {
    cls.kind: cls for cls in (DensePattern, AShapePattern, VerticalSlashPattern, BlockSparsePattern)
}


@dataclass(frozen=True)
class ModelPatterns:
    """Every layer's per-head patterns for one model."""

    model_name: str
    """The model they were searched for (its path or name)."""
    num_layers: int
    """Transformer layers."""
    num_q_heads: int
    """Query heads per layer."""
    layers: tuple[tuple[HeadPattern, ...], ...]
    """layers[layer][head]: that head's pattern."""

    def __post_init__(self) -> None:
        if len(self.layers) != self.num_layers:
            raise ConfigError(f"{len(self.layers)} layers of patterns for num_layers={self.num_layers}")
        for i, layer in enumerate(self.layers):
            if len(layer) != self.num_q_heads:
                raise ConfigError(
                    f"layer {i} has {len(layer)} head patterns; expected num_q_heads={self.num_q_heads}"
                )
            for pattern in layer:
                if type(pattern) not in PATTERN_KINDS.values():
                    raise ConfigError(f"layer {i}: {pattern!r} is not one of {sorted(PATTERN_KINDS)}")

    def layer(self, index: int) -> tuple[HeadPattern, ...]:
        """Patterns of one layer (one per query head)."""
        return self.layers[index]


def default_patterns(model_name: str, num_layers: int, num_q_heads: int) -> ModelPatterns:
    """Vertical-slash with default budgets for every head (used when no searched file exists)."""
    layer = tuple(VerticalSlashPattern() for _ in range(num_q_heads))
    return ModelPatterns(model_name, num_layers, num_q_heads, tuple(layer for _ in range(num_layers)))


def pattern_to_json(pattern: HeadPattern) -> dict[str, Any]:
    """{"kind": ..., field: value, ...}."""
    return {"kind": pattern.kind, **asdict(pattern)}  # type: ignore[call-overload]


def pattern_from_json(data: dict[str, Any]) -> HeadPattern:
    """Inverse of `pattern_to_json`; unknown kinds or fields raise ConfigError."""
    kind = data.get("kind")
    cls = PATTERN_KINDS.get(str(kind))
    if cls is None:
        raise ConfigError(f"unknown pattern kind {kind!r}; expected one of {sorted(PATTERN_KINDS)}")
    names = {f.name for f in fields(cls)}
    extra = set(data) - names - {"kind"}
    if extra:
        raise ConfigError(f"pattern {kind!r} has unknown fields {sorted(extra)}; allowed: {sorted(names)}")
    try:
        pattern: HeadPattern = cls(**{key: value for key, value in data.items() if key != "kind"})
    except TypeError as e:
        raise ConfigError(f"pattern {data!r} is malformed: {e}") from e
    return pattern


def save_patterns(patterns: ModelPatterns, path: str | os.PathLike[str]) -> None:
    """Write `patterns` as JSON at `path`, atomically (temp file + rename)."""
    data = {
        "format": FORMAT,
        "model_name": patterns.model_name,
        "num_layers": patterns.num_layers,
        "num_q_heads": patterns.num_q_heads,
        "layers": [[pattern_to_json(p) for p in layer] for layer in patterns.layers],
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, target)


def load_patterns(path: str | os.PathLike[str]) -> ModelPatterns:
    """Read and validate a patterns file; every problem raises ConfigError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read sparse patterns from {str(path)!r}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{str(path)!r} has format {found!r}; expected {FORMAT!r}")
    try:
        layers = tuple(tuple(pattern_from_json(p) for p in layer) for layer in data["layers"])
        return ModelPatterns(str(data["model_name"]), int(data["num_layers"]), int(data["num_q_heads"]), layers)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{str(path)!r}: {e}") from e
        raise ConfigError(f"{str(path)!r} is malformed ({e!r}); re-run the pattern search") from e


def load_or_default(
    path: str | os.PathLike[str] | None, model_name: str, num_layers: int, num_q_heads: int
) -> ModelPatterns:
    """The file at `path` if it exists (checked against the model's shape), else `default_patterns`."""
    if path is None or not Path(path).exists():
        return default_patterns(model_name, num_layers, num_q_heads)
    patterns = load_patterns(path)
    if (patterns.num_layers, patterns.num_q_heads) != (num_layers, num_q_heads):
        raise ConfigError(
            f"{str(path)!r} holds patterns for {patterns.num_layers} layers x {patterns.num_q_heads} heads; "
            f"the model has {num_layers} x {num_q_heads}: re-run the pattern search for this model"
        )
    return patterns
