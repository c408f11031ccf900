"""Construction helpers of the local engine: device, dtype, context length and KV pool size."""

from __future__ import annotations

import os

import torch

from terse.backend.local.config import EngineConfig
from terse.backend.local.kv_cache import KVCachePool
from terse.backend.local.models.llama import ModelConfig
from terse.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """The configured length, else the model's; capped at a sliding window, which the dense cache
    reproduces exactly only below the window."""
    length = config.max_model_len or model_config.max_position_embeddings
    if model_config.sliding_window is not None:
        length = min(length, model_config.sliding_window)
    return length


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


DEFAULT_MEMORY_FRACTION = {"cuda": 0.85, "cpu": 0.5}
"""Cap of the default KV pool, as a fraction of the memory free after the weights are loaded."""


def num_kv_blocks(
    config: EngineConfig, model_config: ModelConfig, max_model_len: int, dtype: torch.dtype, device: torch.device
) -> int:
    """Blocks in the pool: `num_kv_blocks` if given; else what `max_num_seqs` sequences of
    `max_model_len` tokens need, capped by `kv_cache_memory` (default: a fraction of free memory)."""
    bs = config.kv_block_size
    need = config.max_num_seqs * -(-max_model_len // bs)
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = KVCachePool.bytes_per_block(
        num_layers=model_config.num_layers,
        block_size=bs,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        dtype=dtype,
    )
    memory = config.kv_cache_memory
    if memory is None:
        memory = DEFAULT_MEMORY_FRACTION.get(device.type, 0.5)
    budget = int(available_bytes(device) * memory) if isinstance(memory, float) else int(memory)
    blocks = min(budget // per_block, need)
    if blocks < 1:
        raise ConfigError(
            f"kv_cache_memory={config.kv_cache_memory!r} leaves room for no KV block ({per_block} bytes each, "
            f"{available_bytes(device)} bytes free); give more memory or set num_kv_blocks"
        )
    return blocks
