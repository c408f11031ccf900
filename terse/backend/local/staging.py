"""Host -> device transfers that do not wait for the device.

A plain `torch.tensor(values, device="cuda")` copies from pageable memory and synchronizes the stream:
the host then waits for every kernel queued before it, which would serialize the engine's host work
(scheduling, input building, detokenization) with the step running on the GPU. Values go through
pinned memory with a non-blocking copy instead; PyTorch's pinned-memory cache keeps each buffer alive
until its copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def to_device(values: Sequence[Any] | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` on `device`, copied without blocking the host on CUDA."""
    host = torch.as_tensor(np.asarray(values), dtype=dtype) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def pinned_empty(num: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host buffer to fill and then send with `send`: pinned when `device` is a GPU."""
    return torch.empty(num, dtype=dtype, pin_memory=device.type == "cuda")


def send(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host buffer from `pinned_empty` to `device` without blocking the host."""
    if device.type != "cuda":
        return host
    return host.to(device, non_blocking=True)


def send_into(host: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Copy a host buffer from `pinned_empty` into the existing `dest` (same shape) without blocking the
    host; the copy is ordered on the current stream after the work queued before it. -> dest."""
    return dest.copy_(host, non_blocking=dest.device.type == "cuda")


def to_device_parts(parts: Sequence[Sequence[int]], device: torch.device) -> list[torch.Tensor]:
    """Several int64 index lists in one host -> device copy: a view of the device tensor per part."""
    sizes = [len(p) for p in parts]
    if not sum(sizes):
        return [torch.zeros(0, dtype=torch.int64, device=device) for _ in parts]
    return list(to_device([v for p in parts for v in p], torch.int64, device).split(sizes))
