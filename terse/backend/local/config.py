"""`EngineConfig`: every knob of the local engine, validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from terse.backend.local.quant.config import QuantizationConfig
from terse.backend.local.sparse_prefill import SparsePrefillSettings
from terse.backend.types import StreamingKV
from terse.errors import ConfigError

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]

_DEVICES = ("auto", "cpu", "cuda")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


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
    kv_cache_memory: float | int = 0.85
    """KV pool size: a float in (0, 1] is a fraction of the free device memory after the weights are
    loaded (on CPU: of the available RAM); an int is a number of bytes. The pool never gets more blocks
    than `max_num_seqs` full-length sequences need."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks, overriding `kv_cache_memory` (small pools for tests and benchmarks)."""
    max_model_len: int | None = None
    """Most tokens (prompt + completion) per sequence; None takes the model's max_position_embeddings."""
    enable_prefix_cache: bool = True
    """Share the KV of common prompt prefixes between requests through the radix prefix cache."""
    enable_cuda_graphs: bool = True
    """Capture decode steps as CUDA graphs for padded batch sizes (CUDA only; ignored on CPU)."""
    max_cuda_graph_batch_size: int = 256
    """Largest decode batch captured as a CUDA graph; larger decode batches run eagerly."""
    default_streaming_kv: StreamingKV | None = None
    """KV policy for requests whose SamplingParams.streaming_kv is None: None keeps the dense cache."""
    prefill_attention: str = "dense"
    """Name of the prefill attention path (see `terse.backend.local.attention.PREFILL_PATHS`)."""
    sparse_prefill: SparsePrefillSettings = field(default_factory=SparsePrefillSettings)
    """Sparse prefill of long uncached prompt chunks (off by default; see `sparse_prefill.py`)."""
    quantization: QuantizationConfig | None = None
    """INT4 weight-only quantization when the model loads (`QuantizationConfig`; "int4" or a dict of its
    fields is accepted and converted); None keeps the checkpoint's weights (a GPTQ / AWQ / terse-quantized
    checkpoint loads quantized either way)."""

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
        memory = self.kv_cache_memory
        if isinstance(memory, bool) or not isinstance(memory, int | float):
            raise ConfigError(f"kv_cache_memory={memory!r} must be a fraction in (0, 1] or a byte count")
        if isinstance(memory, float) and not 0.0 < memory <= 1.0:
            raise ConfigError(
                f"kv_cache_memory={memory} is a float outside (0, 1]; give a fraction such as 0.85 "
                f"or an int number of bytes"
            )
        if isinstance(memory, int) and memory < 1:
            raise ConfigError(f"kv_cache_memory={memory} bytes must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks={self.num_kv_blocks} must be >= 1 or None")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len={self.max_model_len} must be >= 2 or None (model default)")
        if not isinstance(self.sparse_prefill, SparsePrefillSettings):
            raise ConfigError(
                f"sparse_prefill={self.sparse_prefill!r} must be a SparsePrefillSettings, e.g. "
                f"SparsePrefillSettings(enabled=True)"
            )
        if not self.prefill_attention:
            raise ConfigError("prefill_attention must name a prefill path, e.g. 'dense'")
