"""`EngineConfig`: every knob of the local engine, validated when it is built. Imports no torch."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from terse.backend.local.quant.config import QuantizationConfig
from terse.backend.local.speculative import SpeculativeSettings
from terse.backend.types import StreamingKV
from terse.errors import ConfigError
from terse.kernels.prefill_config import EstimateConfig, SparsePrefillConfig
from terse.validation import check_choice

CUDA_GRAPH_BLAS = ("auto", "cublas", "cublaslt")
"""`EngineConfig.cuda_graph_blas`: time both libraries per captured size and keep the faster, or one."""

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]

_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "float32", "bfloat16", "float16")

MODEL_PATTERNS_FILE = "sparse_patterns.json"
"""Where `terse sparse-patterns MODEL` saves a model's patterns; the engine picks them up from there."""


@dataclass(frozen=True)
class SparsePrefillSettings:
    """Sparse prefill of the local engine (see sparse_prefill.py): whether it runs, which per-head
    patterns it uses, and the kernels' own `SparsePrefillConfig`. Frozen; a bad value raises
    `ConfigError` naming the fix."""

    enabled: bool = False
    """Run long uncached prompt chunks through the sparse kernels (False: every prefill is dense)."""
    patterns_path: str | None = None
    """Per-head patterns JSON from `terse sparse-patterns`. None: the model directory's
    `sparse_patterns.json` when there is one, else the kernels' default patterns (vertical-slash on
    every head)."""
    kernel: SparsePrefillConfig = field(default_factory=SparsePrefillConfig)
    """The kernels' settings: `min_sparse_q_len` (uncached tokens of a chunk from which it prefills
    sparsely; shorter chunks stay dense), tile sizes, backend ("auto": Triton on CUDA for the head dims
    it is built for, torch otherwise) and the estimators' knobs."""

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"sparse_prefill.enabled={self.enabled!r} must be true or false")
        if not isinstance(self.kernel, SparsePrefillConfig):
            raise ConfigError(
                f"sparse_prefill.kernel={self.kernel!r} must be a SparsePrefillConfig, e.g. "
                f"SparsePrefillConfig(min_sparse_q_len=4096)"
            )
        if self.patterns_path is not None and not os.path.isfile(self.patterns_path):
            raise ConfigError(
                f"sparse_prefill.patterns_path={self.patterns_path!r} is not a file; write one with "
                f"`terse sparse-patterns MODEL --prompt-file F`, or leave it unset for the defaults"
            )

    @classmethod
    def from_table(cls, values: Mapping[str, Any]) -> SparsePrefillSettings:
        """From plain data: `enabled`, `patterns_path`, and the kernels' fields either under `kernel`
        or at the top level (`{"enabled": true, "min_sparse_q_len": 4096}`); `estimate` a table of
        `EstimateConfig` fields. Unknown names raise `ConfigError` listing the known ones."""
        own = {"enabled", "patterns_path"}
        kernel_fields = {f.name for f in fields(SparsePrefillConfig)}
        unknown = sorted(set(values) - own - kernel_fields - {"kernel"})
        if unknown:
            raise ConfigError(
                f"unknown sparse_prefill fields {unknown}; known: {sorted(own | kernel_fields | {'kernel'})}"
            )
        kernel = values.get("kernel", {})
        if isinstance(kernel, Mapping):
            flat = {k: v for k, v in values.items() if k in kernel_fields}
            kernel = dict(kernel) | flat
            if isinstance(kernel.get("estimate"), Mapping):
                kernel["estimate"] = _build(EstimateConfig, kernel["estimate"], "sparse_prefill.estimate")
            kernel = _build(SparsePrefillConfig, kernel, "sparse_prefill.kernel")
        return cls(**{k: v for k, v in values.items() if k in own}, kernel=kernel)


@dataclass(frozen=True)
class EngineConfig:
    """How the local engine runs. Frozen; a bad value raises `ConfigError` naming the fix."""

    device: DeviceName = "auto"
    """"cuda" when a GPU is visible under "auto", else "cpu"."""
    dtype: DtypeName = "auto"
    """Weight and KV dtype. "auto": bfloat16 on CUDA, float32 on CPU."""
    max_num_seqs: int = 256
    """Most sequences running at once (the decode batch size limit)."""
    max_num_batched_tokens: int = 4096
    """Token budget of one step: decode tokens plus prefill chunk tokens. Long prompts are prefilled in
    chunks of at most this many tokens, interleaved with the decodes of running sequences."""
    kv_block_size: int = 16
    """Tokens per KV cache block (the unit of allocation and of prefix sharing)."""
    kv_cache_memory: float | int | None = None
    """Most memory the KV pool may take: a float in (0, 1] is a fraction of the memory free after the
    weights are loaded (on CPU: of the available RAM), an int a number of bytes. None: the pool holds
    what `max_num_seqs` sequences of `max_model_len` tokens need, capped at 0.85 of free GPU memory or
    0.5 of available RAM. The pool never gets more blocks than that need, and on CPU only the blocks
    ever in use at once become resident (see kv_cache.py)."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks, overriding `kv_cache_memory` (small pools for tests and benchmarks)."""
    max_model_len: int | None = None
    """Most tokens (prompt + completion) per sequence; None takes the model's max_position_embeddings."""
    enable_prefix_cache: bool = True
    """Share the KV of common prompt prefixes between requests through the radix prefix cache."""
    enable_cuda_graphs: bool = True
    """Capture decode steps as CUDA graphs for padded batch sizes (CUDA only; ignored on CPU)."""
    max_cuda_graph_batch_size: int = 256
    """Largest decode batch captured as a CUDA graph, in rows (a sequence verifying k draft tokens takes
    k + 1); larger decode batches run eagerly."""
    cuda_graph_blas: str = "auto"
    """BLAS library of the matrix products inside the captured decode graphs: "auto" captures each batch
    size of a 16-bit model with cuBLAS and with cuBLASLt and keeps the graph that replays faster (a few
    seconds more at start; float32 models keep cuBLAS, torch's default); "cublas" or "cublaslt" captures
    with that one."""
    default_streaming_kv: StreamingKV | None = None
    """KV policy for requests whose SamplingParams.streaming_kv is None: None keeps the dense cache."""
    sparse_prefill: SparsePrefillSettings = field(default_factory=SparsePrefillSettings)
    """Sparse prefill of long uncached prompt chunks (off by default; see `sparse_prefill.py`)."""
    quantization: QuantizationConfig | None = None
    """INT4 weight-only quantization when the model loads (`QuantizationConfig`; "int4" or a dict of its
    fields is accepted and converted); None keeps the checkpoint's weights (a GPTQ / AWQ / terse-quantized
    checkpoint loads quantized either way)."""
    speculative: SpeculativeSettings | None = None
    """Speculative decoding (see `speculative.py`): None decodes one token per step and sequence."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantization", QuantizationConfig.parse(self.quantization))
        if self.device not in _DEVICES:
            raise ConfigError(f"device={self.device!r} is not one of {_DEVICES}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {_DTYPES}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_block_size", "max_cuda_graph_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an int >= 1")
        if self.kv_block_size & (self.kv_block_size - 1):
            raise ConfigError(f"kv_block_size={self.kv_block_size} must be a power of two (16 is usual)")
        check_choice("cuda_graph_blas", self.cuda_graph_blas, CUDA_GRAPH_BLAS)
        _check_memory(self.kv_cache_memory)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks={self.num_kv_blocks} must be >= 1 or None")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len={self.max_model_len} must be >= 2 or None (model default)")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeSettings):
            raise ConfigError(
                f"speculative={self.speculative!r} must be a SpeculativeSettings or None, e.g. "
                f"SpeculativeSettings(num_draft_tokens=4) (from options: 'prompt_lookup' or a table of its fields)"
            )
        if not isinstance(self.sparse_prefill, SparsePrefillSettings):
            raise ConfigError(
                f"sparse_prefill={self.sparse_prefill!r} must be a SparsePrefillSettings, e.g. "
                f"SparsePrefillSettings(enabled=True)"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> EngineConfig:
        """Build from plain data (keyword options, a parsed JSON / TOML table): unknown names raise;
        `kv_cache_memory` may be a size string ("8GiB", "0.3"); `sparse_prefill` may be true / false or a
        table of `SparsePrefillSettings` fields; `default_streaming_kv` a table of `StreamingKV` fields;
        `speculative` a method name ("prompt_lookup"), true / false or a table of `SpeculativeSettings` fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown EngineConfig fields {unknown}; known fields: {sorted(known)}")
        values = dict(options)
        if isinstance(values.get("kv_cache_memory"), str):
            values["kv_cache_memory"] = parse_memory(values["kv_cache_memory"])
        sparse = values.get("sparse_prefill")
        if isinstance(sparse, bool):
            values["sparse_prefill"] = SparsePrefillSettings(enabled=sparse)
        elif isinstance(sparse, Mapping):
            values["sparse_prefill"] = SparsePrefillSettings.from_table(sparse)
        values["speculative"] = _speculative(values.get("speculative"))
        streaming = values.get("default_streaming_kv")
        if isinstance(streaming, Mapping):
            values["default_streaming_kv"] = _build(StreamingKV, streaming, "default_streaming_kv")
        return cls(**values)


def _speculative(value: Any) -> Any:
    """`speculative` from plain data: a method name ("prompt_lookup"), true / false / none, or a table of
    `SpeculativeSettings` fields."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "none", "off")):
        return None
    if value is True:
        return SpeculativeSettings()
    if isinstance(value, str):
        return SpeculativeSettings(method=value)  # type: ignore[arg-type]
    if isinstance(value, Mapping):
        return _build(SpeculativeSettings, value, "speculative")
    return value


def _build(kind: Any, values: Mapping[str, Any], name: str) -> Any:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {name} fields {unknown}; known: {sorted(known)}")
    return kind(**values)


def _check_memory(memory: object) -> None:
    if memory is None:
        return
    if isinstance(memory, bool) or not isinstance(memory, int | float):
        raise ConfigError(f"kv_cache_memory={memory!r} must be a fraction in (0, 1], a byte count or None")
    if isinstance(memory, float) and not 0.0 < memory <= 1.0:
        raise ConfigError(
            f"kv_cache_memory={memory} is a float outside (0, 1]; give a fraction such as 0.5 "
            f"or an int number of bytes"
        )
    if isinstance(memory, int) and memory < 1:
        raise ConfigError(f"kv_cache_memory={memory} bytes must be >= 1")


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def parse_memory(text: str) -> float | int:
    """"0.3" -> 0.3 (a fraction of free memory); "8GiB", "512MB", "1073741824" -> bytes."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"kv_cache_memory={text!r} is neither a fraction nor a size; write e.g. 0.3 (of free memory), "
            f"8GiB, 512MiB or a byte count"
        )
    number = float(match.group(1))
    if not unit and "." in match.group(1):
        _check_memory(number)
        return number
    size = int(number * _UNITS[unit])
    _check_memory(size)
    return size
