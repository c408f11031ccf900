"""Configuration of a doc-QA job: one frozen, validated dataclass per stage, loadable from JSON or TOML.

The stages hold the libraries' own configs (a `RetrieverConfig`, a `Budget` and a `CompressorConfig`,
`SamplingParams`) with doc-QA's defaults defined once below (`DOCQA_RETRIEVER`, `DOCQA_BUDGET`,
`DOCQA_COMPRESSOR`, `DOCQA_GENERATION`). Every stage can be switched off (`enabled = false`) and every
value is checked where it is built, so a bad file fails at load time with a `ConfigError` naming the
dotted key, the value and a working alternative. A file states only what it changes, at any depth.

File layout (TOML shown; JSON uses the same nesting):

    backend = "local:path/to/model"
    [retrieval]
    top_k = 4
    [retrieval.retriever.chunker]          # terse.retrieval.ChunkerConfig
    chunk_tokens = 128
    [compression.budget]                   # terse.compress.Budget: target_tokens or rate
    target_tokens = 320
    [compression.compressor]               # terse.compress.CompressorConfig
    ranker = "bm25"
    [organize]
    mode = "off"
    [generation]                           # terse.SamplingParams
    max_tokens = 48
    [run]
    batch_size = 16

Keys of the earlier flat layout (`compression.target_tokens`, `retrieval.chunk_tokens`, `run.runner`,
...) fail naming their new place (`RENAMED_KEYS`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from terse.backend.types import SamplingParams
from terse.compress.config import Budget, CompressorConfig
from terse.config_data import config_from_data, config_to_data
from terse.errors import ConfigError
from terse.retrieval.config import ChunkerConfig, RetrieverConfig
from terse.validation import check_choice, check_int, require

SearchMode = Literal["dense", "bm25", "hybrid"]
OrganizeMode = Literal["off", "sot", "dag", "auto"]
DispatchName = Literal["auto", "batch", "async"]

DOCQA_RETRIEVER = RetrieverConfig(chunker=ChunkerConfig(chunk_tokens=128, overlap_tokens=16))
"""The library's retriever with smaller chunks than its 200 / 32 tokens (doc-QA's setting from the
start, kept): `top_k` = 4 chunks of 128 embedder tokens give the compressor about twice its 240-token
budget to choose from."""

DOCQA_BUDGET = Budget(target_tokens=240)
"""Passages plus question, in the generation model's tokenizer."""

DOCQA_COMPRESSOR = CompressorConfig(ranker="bm25", sentence_ranker="same", token_pruner=None, reorder="original")
"""Scorer-free by default: BM25 ranks passages and sentences (no model call), no token pruner, and
passages keep their retrieved order (chunks of one document read in document order)."""

DOCQA_GENERATION = SamplingParams(max_tokens=64, stop=("\n\n",))
"""Greedy (reproducible, and what the benchmark uses), short answers ending at a blank line."""


@dataclass(frozen=True)
class RetrievalConfig:
    """Which passages of the documents a question sees. Off: every relevant document, whole."""

    enabled: bool = True
    """Search chunks per question; False pastes the question's documents (or all documents) whole."""
    top_k: int = 4
    """Chunks kept per question, best first."""
    mode: SearchMode = "hybrid"
    """"dense" (embeddings), "bm25" (lexical) or "hybrid" (both, fused by reciprocal rank)."""
    retriever: RetrieverConfig = DOCQA_RETRIEVER
    """Chunking (sizes in the embedder tokenizer's tokens), embedder (the default works offline) and
    index of a newly built index; a reopened index keeps the settings it was built with."""
    index_dir: str | None = None
    """Directory of a persisted index: reused when it exists, written after building otherwise; None
    keeps the index in memory for this run only."""
    min_context_tokens: int = 4096
    """Retrieve only for questions whose documents exceed this many tokens (generation tokenizer);
    smaller contexts go whole to compression, whose BM25 coarse stage ranks them at no model cost.
    Why: embedding a chunk costs about as much as a small generation model reading it, so below a few
    thousand tokens retrieval is slower than letting compression select. 0 always retrieves."""

    def __post_init__(self) -> None:
        check_int("top_k", self.top_k, low=1, example=4)
        check_int("min_context_tokens", self.min_context_tokens, low=0, example="4096 (0 always retrieves)")
        check_choice("mode", self.mode, ("dense", "bm25", "hybrid"))
        require(isinstance(self.retriever, RetrieverConfig),
                f"retriever={self.retriever!r} must be a RetrieverConfig")


@dataclass(frozen=True)
class CompressionConfig:
    """Question-aware compression of the passages to a token budget (terse.compress)."""

    enabled: bool = True
    """Compress the passages; False sends them as retrieved."""
    budget: Budget = DOCQA_BUDGET
    """Token budget of passages plus question (`target_tokens`), or the share of the passages' tokens
    to keep (`rate`), in the generation model's tokenizer."""
    compressor: CompressorConfig = DOCQA_COMPRESSOR
    """The compressor's stages. A config that calls the model (the "lm" ranker, a token pruner) scores
    with the job's backend; a local engine batches the questions' scorer calls."""

    def __post_init__(self) -> None:
        require(isinstance(self.budget, Budget), f"budget={self.budget!r} must be a Budget")
        require(isinstance(self.compressor, CompressorConfig),
                f"compressor={self.compressor!r} must be a CompressorConfig")


@dataclass(frozen=True)
class OrganizeConfig:
    """How answers are written: directly, or organized by terse.organize."""

    mode: OrganizeMode = "off"
    """"off" (one generation), "sot" (Skeleton-of-Thought, rule-routed), "dag" (sub-question plan),
    "auto" (SoT where the question asks for a list, direct otherwise)."""

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, ("off", "sot", "dag", "auto"))


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
    submit_ahead: bool = True
    """batch dispatch with preparation in this process: submit batch N+1 (prepared while batch N
    generates) before collecting batch N's answers, so the backend never idles between batches and
    runs up to two batches in the same steps. False: one batch at a time (a batch's answers never
    share a step with the next batch)."""
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
        check_choice("dispatch", self.dispatch, ("auto", "batch", "async"))
        for name, example in (("batch_size", 16), ("concurrency", 8), ("prepare_workers", 8),
                              ("max_consecutive_unavailable", 8)):
            check_int(name, getattr(self, name), low=1, example=example)
        if self.prepare_processes != "auto":
            check_int("prepare_processes", self.prepare_processes, low=0, example='"auto" or 4')
        require(isinstance(self.submit_ahead, bool), f"submit_ahead={self.submit_ahead!r} must be true or false")
        check_choice("prepare_start_method", self.prepare_start_method, ("spawn", "forkserver", "fork"))
        require(self.requests_per_s is None or (isinstance(self.requests_per_s, int | float)
                                                 and self.requests_per_s > 0),
                f"requests_per_s={self.requests_per_s!r} must be > 0 or null (unlimited)")


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
    generation: SamplingParams = DOCQA_GENERATION
    """Sampling of the answers (every `SamplingParams` field; `max_tokens` >= 1)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Scheduling, retries, progress."""

    def __post_init__(self) -> None:
        require(isinstance(self.backend, str),
                f"backend={self.backend!r} must be a spec string, e.g. 'local:model/'")
        require(isinstance(self.backend_options, dict),
                f"backend_options={self.backend_options!r} must be a table / object of options")
        require(isinstance(self.generation, SamplingParams),
                f"generation={self.generation!r} must be SamplingParams")
        check_int("generation.max_tokens", self.generation.max_tokens, low=1, example=64)
        if self.backend.startswith("local:") and self.backend_options:
            from terse.backend.local.config import EngineConfig

            EngineConfig.from_options(self.backend_options)  # fail at load time, naming the field

    def with_overrides(self, **sections: Any) -> DocQAConfig:
        """A copy with fields of nested sections replaced, at any depth, e.g.
        `with_overrides(retrieval={"top_k": 8}, compression={"budget": {"rate": 0.25}})`."""
        return config_from_data(DocQAConfig, sections, base=self, renamed=RENAMED_KEYS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DocQAConfig:
        """Build from nested plain data (a parsed JSON or TOML file); unknown keys raise ConfigError."""
        return config_from_data(cls, data, renamed=RENAMED_KEYS)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested data; `from_dict(to_dict())` gives an equal config."""
        return config_to_data(self)


RENAMED_KEYS = {
    "run.runner": "run.dispatch",
    "retrieval.chunk_tokens": "retrieval.retriever.chunker.chunk_tokens",
    "retrieval.overlap_tokens": "retrieval.retriever.chunker.overlap_tokens",
    "retrieval.embedder": "retrieval.retriever.embedder.model",
    "compression.target_tokens": "compression.budget.target_tokens",
    "compression.rate": "compression.budget.rate",
    "compression.ranker": "compression.compressor.ranker",
    "compression.token_pruner": 'compression.compressor.token_pruner ("parallel", "iterative" or null)',
}
"""Keys of the earlier flat layout -> where they live now (a file using one fails naming the new key)."""


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
