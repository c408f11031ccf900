"""Triton argmax over the last dim of [B, V] logits in one launch: greedy sampling's token per row.

`argmax_rows(logits)` equals `torch.argmax(logits, dim=-1)` exactly: the first index of the maximum,
and NaN counts as larger than everything (the first NaN of a row wins, as in torch); a row of -inf
gives 0. torch's reduction of one vocabulary-wide row (batch-1 decode) takes tens of microseconds on
a GPU (27 us at 128256 on an H200, bench/decode_profile.py), far above the time to read the row; here
each row is split into chunks over many programs, and the last program of a row to finish reduces
the partials (3.6 us):

    program (row b, chunk c):  partials[b, c] = (max, first index of it) over its CHUNK elements
                               barrier; n = atomic_add(counters[b], 1) (acquire-release)
                               n == num_chunks - 1  ->  out[b] = first index of the max over
                                                        partials[b, :] (.cg loads); counters[b] = 0

Why one launch with arrival counters rather than a second reduction launch: it saves a launch per
decode step, and the counters reset themselves, so one zero-initialised int32 array per device
(allocated once, never freed) serves every later launch in stream order, CUDA graph replays included.
Nothing is read back to the host and the grid depends only on shapes, so a launch can be captured.
Launches that share a device's counters must run in stream order (the engine samples on one stream).

Ties across chunks keep the smallest index: a chunk's partial is its first maximum, and the final step
takes the smallest index among the partials equal to the maximum (or among the NaN partials).
Values are compared in float32, which holds float16 and bfloat16 exactly.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from terse.errors import KernelInputError
from terse.kernels.checks import interpreting
from terse.kernels.dependent_launch import launch_options, wait_for_previous_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_CHUNK = 2048
"""Elements per program at least: a 128256-wide row runs in 63 programs."""
MAX_CHUNKS = 256
"""Programs per row at most (wider rows get larger chunks): the final step loads them in one block."""
MAX_ROWS_PER_LAUNCH = 1 << 16
"""Rows one launch covers (the size of the per-device counter array); more rows take more launches."""
_NO_INDEX: tl.constexpr = tl.constexpr(2**31 - 1)
"""Index of no element (above every column index): the neutral element of the first-index minimum."""

_COUNTERS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _first_max(values, index, valid):
    # values: [N] float32, index: [N] int32 (increasing), valid: [N] -> (max, its first index), NaN largest
    is_nan = (values != values) & valid
    first_nan = tl.min(tl.where(is_nan, index, _NO_INDEX), axis=0)
    plain = tl.where(valid & (values == values), values, float("-inf"))
    top = tl.max(plain, axis=0)
    first_top = tl.min(tl.where(valid & (plain == top), index, _NO_INDEX), axis=0)
    has_nan = first_nan != _NO_INDEX
    return tl.where(has_nan, float("nan"), top), tl.where(has_nan, first_nan, first_top)


@triton.jit
def _argmax_kernel(  # type: ignore[no-untyped-def]  # Triton reads the annotations itself
    x_ptr, out_ptr, part_val_ptr, part_idx_ptr, counter_ptr, stride_x, V, num_chunks,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = cols < V
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
    value, index = _first_max(x, cols, mask)
    part = row * BLOCK_C + chunk
    tl.store(part_val_ptr + part, value)
    tl.store(part_idx_ptr + part, index)
    tl.debug_barrier()  # every thread's stores are issued before the release below
    arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
    if arrived == num_chunks - 1:
        offs = tl.arange(0, BLOCK_C)
        live = offs < num_chunks
        vals = tl.load(part_val_ptr + row * BLOCK_C + offs, mask=live, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(part_idx_ptr + row * BLOCK_C + offs, mask=live, other=_NO_INDEX, cache_modifier=".cg")
        _, best = _first_max(vals, idxs, live)
        tl.store(out_ptr + row, best.to(tl.int64))
        tl.atomic_xchg(counter_ptr + row, 0)


def chunk_size(vocab: int) -> int:
    """Elements per program for rows of `vocab`: MIN_CHUNK, or more so a row needs at most MAX_CHUNKS."""
    return max(MIN_CHUNK, triton.next_power_of_2(triton.cdiv(vocab, MAX_CHUNKS)))


def argmax_rows(logits: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """logits: [B, V] float32 / float16 / bfloat16 with unit last stride -> int64 [B], equal to
    `torch.argmax(logits, dim=-1)` (first index of the maximum; the first NaN when a row has one).

    `chunk` (a power of two) overrides the elements per program (tests use small ones)."""
    _check_logits(logits)
    num_rows, vocab = logits.shape
    chunk = chunk_size(vocab) if chunk is None else chunk
    if chunk < 1 or chunk & (chunk - 1):
        raise KernelInputError(f"chunk must be a power of two, got {chunk}")
    num_chunks = triton.cdiv(vocab, chunk)
    if num_chunks > MAX_CHUNKS:
        raise KernelInputError(
            f"chunk {chunk} splits V = {vocab} into {num_chunks} chunks, more than {MAX_CHUNKS}; pass a larger chunk "
            "or none (chunk_size picks one)"
        )
    block_c = triton.next_power_of_2(num_chunks)
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    counters = _counters(logits.device)
    rows_per_launch = min(num_rows, MAX_ROWS_PER_LAUNCH)
    part_vals = torch.empty(rows_per_launch * block_c, dtype=torch.float32, device=logits.device)
    part_idxs = torch.empty(rows_per_launch * block_c, dtype=torch.int32, device=logits.device)
    # launch on the logits' GPU, whichever is current (a transformers model spread over several GPUs
    # gives its logits on the last one)
    with torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext():
        for start in range(0, num_rows, MAX_ROWS_PER_LAUNCH):
            rows = logits[start : start + MAX_ROWS_PER_LAUNCH]  # [b, V]
            _argmax_kernel[(rows.shape[0], num_chunks)](
                rows, out[start:], part_vals, part_idxs, counters, rows.stride(0), vocab, num_chunks,
                CHUNK=chunk, BLOCK_C=block_c, **launch_options(logits),
            )
    return out


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise KernelInputError(f"logits must be [B, V], got shape {tuple(logits.shape)}; reshape to 2 dims")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(
            f"logits are {logits.dtype}; argmax_rows takes {SUPPORTED_DTYPES} (use torch.argmax for others)"
        )
    if logits.shape[1] == 0:
        raise KernelInputError("logits have V = 0 columns; an argmax needs at least one")
    if logits.shape[1] >= _NO_INDEX.value:
        raise KernelInputError(f"V = {logits.shape[1]} does not fit int32 indices; use torch.argmax")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise KernelInputError(f"logits have last stride {logits.stride(1)}; pass logits.contiguous()")
    if logits.device.type != "cuda" and not interpreting():
        raise KernelInputError(
            f"logits are on {logits.device}; argmax_rows needs CUDA (or TRITON_INTERPRET=1); use torch.argmax"
        )


def _counters(device: torch.device) -> torch.Tensor:
    """The device's arrival counters, int32 [MAX_ROWS_PER_LAUNCH], zero between launches."""
    counters = _COUNTERS.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"argmax_rows first runs on {device} inside a CUDA graph capture; run it once before capturing "
                "so its counters are allocated outside the graph"
            )
        counters = _COUNTERS[device] = torch.zeros(MAX_ROWS_PER_LAUNCH, dtype=torch.int32, device=device)
    return counters
