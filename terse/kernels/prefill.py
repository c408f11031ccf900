"""The sparse prefill entry point the engine calls for one attention layer.

    layout = VarlenLayout.from_lengths(q_lens, k_lens, device)       # once per step
    out = sparse_prefill(VarlenBatch(q, k, v, layout), layer_patterns, scale, config=SparsePrefillConfig())

q [total_q, Hq, D], k/v [total_k, Hkv, D] in the varlen layout of `terse.kernels.varlen` (queries are the
last q_len of k_len tokens, so prefix-cache hits work); layer_patterns: one `HeadPattern` per query head
(`ModelPatterns.layer(i)`); out [total_q, Hq, D] in q's dtype. `sparse_prefill_attention` takes the
layout as loose offsets and maxima instead (the engine's current call) and builds it per call.

Dense fallback (`choose_prefill_path`): a sequence whose q_len is below `config.min_sparse_q_len` is
computed densely (torch SDPA: cuDNN / FlashAttention on the GPU), because below that length index
estimation (2-3 ms per layer) and the sparse kernels' lower per-tile rate (~65% of cuDNN's) cost more
than the skipped tiles save. Measured on the H200 (docs/benchmarks.md, 8B-shape layer, vertical-slash):
0.75x cuDNN at 16K tokens, 1.4x at 24K, 1.9x at 32K, 9x at 128K; the default 32K keeps a margin for
heads less sparse than the benchmark's. When every sequence is short the whole
call is one dense pass; in a mixed batch the sparse pass runs batched and the short sequences' rows are
then recomputed densely (cheap by definition).

Sparse pass: heads are grouped by pattern kind and each group runs as one launch over the whole batch
through `head_ids`: dense and a-shape heads -> `a_shape_attention`; vertical-slash heads -> estimate +
on-device conversion -> `block_sparse_attention` with columns; block-sparse heads -> estimate ->
`block_sparse_attention`. On CUDA (or with backend="triton") the Triton kernels run; otherwise the torch
path computes the same masks (`terse.kernels.reference`) through SDPA, one sequence at a time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, TypedDict

import torch

from terse.errors import ConfigError, KernelInputError
from terse.kernels.checks import SUPPORTED_HEAD_DIMS, check_block_size
from terse.kernels.estimate import EstimateConfig, estimate_vertical_slash
from terse.kernels.estimate_blocks import estimate_block_sparse
from terse.kernels.patterns import (
    PATTERN_KINDS,
    AShapePattern,
    HeadPattern,
)
from terse.kernels.reference import a_shape_mask, block_sparse_mask, vertical_slash_mask
from terse.kernels.varlen import VarlenBatch, VarlenLayout
from terse.validation import check_choice, check_int


@dataclass(frozen=True)
class SparsePrefillConfig:
    """How one layer's prefill attention is computed."""

    min_sparse_q_len: int = 32768
    """Sequences with fewer new query tokens than this run dense (measured crossover on the H200)."""
    block_size_q: int = 64
    """Query tile and index block size (16, 32, 64 or 128)."""
    block_size_k: int = 64
    """Key tile and index block size (16, 32, 64 or 128)."""
    backend: Literal["auto", "triton", "torch"] = "auto"
    """auto: Triton kernels on CUDA (head dims 64 / 128), torch otherwise; triton on the CPU needs
    TRITON_INTERPRET=1."""
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    """Online estimation knobs (last queries, forced sinks and local diagonals)."""

    def __post_init__(self) -> None:
        check_int("min_sparse_q_len", self.min_sparse_q_len, low=1, example=32768)
        check_block_size("block_size_q", self.block_size_q, ConfigError)
        check_block_size("block_size_k", self.block_size_k, ConfigError)
        check_choice("backend", self.backend, ("auto", "triton", "torch"))


def choose_prefill_path(q_len: int, config: SparsePrefillConfig) -> Literal["dense", "sparse"]:
    """Dense below `config.min_sparse_q_len` new query tokens, sparse from there on."""
    return "sparse" if q_len >= config.min_sparse_q_len else "dense"


class BlockSizes(TypedDict):
    """The tile sizes as keyword arguments of the launchers and the block-sparse estimator."""

    block_size_q: int
    block_size_k: int


class PrefillCall(NamedTuple):
    """One call's inputs, handed whole to the per-kind head-group paths."""

    batch: VarlenBatch
    scale: float
    config: SparsePrefillConfig
    use_triton: bool

    @property
    def block_sizes(self) -> BlockSizes:
        """The configured tile sizes, to pass as `**call.block_sizes`."""
        return BlockSizes(block_size_q=self.config.block_size_q, block_size_k=self.config.block_size_k)


def dense_attention(call: PrefillCall, out: torch.Tensor, seq_ids: Sequence[int] | None = None) -> None:
    """Dense causal attention (bottom-right aligned when q_len < k_len) into `out`, per sequence via SDPA."""
    batch, layout = call.batch, call.batch.layout
    for b in range(batch.num_seqs) if seq_ids is None else seq_ids:
        q_rows, k_rows = layout.q_rows(b), layout.k_rows(b)
        q_len, k_len = q_rows.stop - q_rows.start, k_rows.stop - k_rows.start
        if q_len == 0:
            continue
        q_b = batch.q[q_rows].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        k_b = batch.k[k_rows].transpose(0, 1)[None]  # [1, Hkv, k_len, D]
        v_b = batch.v[k_rows].transpose(0, 1)[None]
        if q_len == k_len:
            o = torch.nn.functional.scaled_dot_product_attention(
                q_b, k_b, v_b, is_causal=True, scale=call.scale, enable_gqa=True
            )
        else:
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(q_len, k_len)
            o = torch.nn.functional.scaled_dot_product_attention(
                q_b, k_b, v_b, attn_mask=bias, scale=call.scale, enable_gqa=True
            )
        out[q_rows] = o[0].transpose(0, 1)


TORCH_ROWS_PER_CHUNK = 2048  # query rows per SDPA call on the torch path (bounds the float mask it builds)


def _torch_masked(
    call: PrefillCall,
    head_ids: torch.Tensor,
    mask_of: Callable[[int, int, int, int], torch.Tensor],
    out: torch.Tensor,
) -> None:
    # mask_of(b, q_len, k_len, i) -> [1, q_len, k_len] bool for the i-th head of head_ids; one head at a
    # time and query rows in chunks keep memory at one head's mask instead of all heads'
    batch, layout = call.batch, call.batch.layout
    for b, (q_len, k_len) in enumerate(layout.lengths):
        if q_len == 0:
            continue
        q_start, k_rows = layout.q_rows(b).start, layout.k_rows(b)
        for i, head in enumerate(head_ids.tolist()):
            mask = mask_of(b, q_len, k_len, i)[0]  # [q_len, k_len]
            k_h = batch.k[k_rows, head // batch.group_size]  # [k_len, D]
            v_h = batch.v[k_rows, head // batch.group_size]
            for r in range(0, q_len, TORCH_ROWS_PER_CHUNK):
                rows = slice(q_start + r, q_start + min(r + TORCH_ROWS_PER_CHUNK, q_len))
                o = torch.nn.functional.scaled_dot_product_attention(
                    batch.q[rows, head], k_h, v_h, attn_mask=mask[r : r + TORCH_ROWS_PER_CHUNK], scale=call.scale
                )  # [rows, D]
                out[rows, head] = o.nan_to_num(0.0).to(out.dtype)


def _attend_a_shape(call: PrefillCall, head_ids: torch.Tensor, patterns: list[HeadPattern], out: torch.Tensor) -> None:
    # dense heads are a-shape heads whose window covers every key
    device = call.batch.q.device
    sinks = [p.num_sink_tokens if isinstance(p, AShapePattern) else 0 for p in patterns]
    windows = [p.window_len if isinstance(p, AShapePattern) else call.batch.layout.max_seqlen_k + 1 for p in patterns]
    num_sink = torch.tensor(sinks, dtype=torch.int32, device=device)
    window = torch.tensor(windows, dtype=torch.int32, device=device)
    if call.use_triton:
        from terse.kernels.a_shape import a_shape_attention

        a_shape_attention(call.batch, num_sink, window, call.scale, head_ids=head_ids, out=out, **call.block_sizes)
        return
    _torch_masked(
        call, head_ids,
        lambda b, q_len, k_len, i: a_shape_mask(num_sink[i : i + 1], window[i : i + 1], q_len, k_len),
        out,
    )


def _per_head(patterns: list[HeadPattern], names: tuple[str, ...], device: torch.device) -> list[torch.Tensor]:
    # each named field of the group's patterns as a tensor [G]: counts int64, target_mass float32
    return [
        torch.tensor([getattr(p, name) for p in patterns], device=device,
                     dtype=torch.float32 if name == "target_mass" else torch.int64)
        for name in names
    ]


def _attend_indexed(
    call: PrefillCall,
    head_ids: torch.Tensor,
    index: tuple[torch.Tensor, torch.Tensor],
    kernel: tuple[str, str],
    mask_of: Callable[..., torch.Tensor],
    out: torch.Tensor,
) -> None:
    # index: two [B, H, ...] tensors of one index format; kernel: (module, launcher) taking them after
    # the batch (imported only on the Triton path); mask_of(first[b, i:i+1], second[b, i:i+1], q_len,
    # k_len, block_size_q, block_size_k): that format's exact mask for the torch path
    if call.use_triton:
        launcher = getattr(importlib.import_module(kernel[0]), kernel[1])
        launcher(call.batch, *index, call.scale, head_ids=head_ids, out=out, **call.block_sizes)
        return
    first, second, cfg = index[0], index[1], call.config
    _torch_masked(
        call, head_ids,
        lambda b, q_len, k_len, i: mask_of(
            first[b, i : i + 1], second[b, i : i + 1], q_len, k_len, cfg.block_size_q, cfg.block_size_k
        ),
        out,
    )


def _attend_vertical_slash(
    call: PrefillCall, head_ids: torch.Tensor, patterns: list[HeadPattern], out: torch.Tensor
) -> None:
    names = ("num_vertical", "num_slash", "target_mass")
    num_vertical, num_slash, mass = _per_head(patterns, names, call.batch.q.device)
    index = estimate_vertical_slash(
        call.batch, num_vertical, num_slash, mass, call.scale, head_ids=head_ids, config=call.config.estimate
    )
    kernel = ("terse.kernels.vertical_slash", "vertical_slash_attention")
    _attend_indexed(call, head_ids, index, kernel, vertical_slash_mask, out)  # index: (vertical_idx, slash_idx)


def _attend_block_sparse(
    call: PrefillCall, head_ids: torch.Tensor, patterns: list[HeadPattern], out: torch.Tensor
) -> None:
    num_blocks, mass = _per_head(patterns, ("num_blocks", "target_mass"), call.batch.q.device)
    index = estimate_block_sparse(call.batch, num_blocks, mass, call.scale, head_ids=head_ids, **call.block_sizes)
    kernel = ("terse.kernels.block_sparse", "block_sparse_attention")
    _attend_indexed(call, head_ids, index, kernel, block_sparse_mask, out)  # index: (block_idx, block_count)


HeadGroupPath = Callable[[PrefillCall, torch.Tensor, list[HeadPattern], torch.Tensor], None]
"""(call, head_ids [G] int32, the G heads' patterns, out [total_q, Hq, D]): attends the heads of one
pattern kind over the whole batch and writes their rows of `out`."""

# pattern kind -> how a group of heads of that kind attends (dense heads share the a-shape kernel)
PATHS_BY_KIND: dict[str, HeadGroupPath] = {
    "dense": _attend_a_shape,
    "a_shape": _attend_a_shape,
    "vertical_slash": _attend_vertical_slash,
    "block_sparse": _attend_block_sparse,
}


def sparse_prefill(
    batch: VarlenBatch,
    layer_patterns: Sequence[HeadPattern],
    scale: float,
    *,
    config: SparsePrefillConfig | None = None,
) -> torch.Tensor:
    """One layer's causal prefill attention with per-head sparse patterns -> out [total_q, Hq, D]."""
    config = config or SparsePrefillConfig()
    if len(layer_patterns) != batch.num_q_heads:
        raise KernelInputError(
            f"{len(layer_patterns)} head patterns for {batch.num_q_heads} query heads; pass one per query head "
            "(ModelPatterns.layer(i))"
        )
    for pattern in layer_patterns:
        if getattr(pattern, "kind", None) not in PATTERN_KINDS:
            raise KernelInputError(f"{pattern!r} is not a head pattern; use one of {sorted(PATTERN_KINDS)}")
    # auto: Triton on CUDA for the head dims it is compiled for, the torch path otherwise
    kernel_head_dim = batch.head_dim in SUPPORTED_HEAD_DIMS
    use_triton = config.backend == "triton" or (
        config.backend == "auto" and batch.q.device.type == "cuda" and kernel_head_dim
    )
    call = PrefillCall(batch, scale, config, use_triton)
    out = torch.empty_like(batch.q)
    lengths = batch.layout.lengths
    dense_seqs = [b for b, (q_len, _) in enumerate(lengths) if choose_prefill_path(q_len, config) == "dense"]
    if len(dense_seqs) == len(lengths):
        dense_attention(call, out)
        return out
    groups: dict[HeadGroupPath, list[int]] = {}
    for head, pattern in enumerate(layer_patterns):
        groups.setdefault(PATHS_BY_KIND[pattern.kind], []).append(head)
    for attend, heads in groups.items():
        head_ids = torch.tensor(heads, dtype=torch.int32, device=batch.q.device)
        attend(call, head_ids, [layer_patterns[h] for h in heads], out)
    if dense_seqs:
        dense_attention(call, out, dense_seqs)
    return out


def sparse_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    layer_patterns: Sequence[HeadPattern],
    scale: float,
    *,
    config: SparsePrefillConfig | None = None,
) -> torch.Tensor:
    """`sparse_prefill` with the layout given as loose offsets and maxima, validated on every call.

    Kept for callers that do not hold a `VarlenLayout` yet; a caller that attends many layers over one
    layout builds it once and calls `sparse_prefill`.
    """
    layout = VarlenLayout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return sparse_prefill(VarlenBatch(q, k, v, layout), layer_patterns, scale, config=config)
