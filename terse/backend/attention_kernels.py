"""Which fused attention kernels terse's model calls may use on CUDA.

PyTorch's cuDNN attention builds an execution plan for every new (batch, length) shape it sees, about
2 ms per call on an H200. Serving and compression run attention at a new shape on almost every call
(growing prefixes, ragged batches), so the plan building dominates small models: on the iterative
compression stage it made calls 4-5x slower than the flash and memory-efficient kernels, which need
no plan. `no_cudnn_attention(device)` turns cuDNN attention off around terse's forward passes and
restores the caller's setting afterwards. The switch is process-wide in PyTorch, so a depth counter
under a lock keeps overlapping users (several engines, threads) from restoring it early.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_lock = threading.Lock()
_depth = 0
_saved = True


@contextmanager
def no_cudnn_attention(device: torch.device) -> Iterator[None]:
    """Within the block, scaled_dot_product_attention picks flash, memory-efficient or math kernels."""
    global _depth, _saved
    if device.type != "cuda":
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.backends.cuda.enable_cudnn_sdp(_saved)
