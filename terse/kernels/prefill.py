"""The sparse prefill entry point the engine calls for one attention layer.

    out = sparse_prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   layer_patterns, scale, config=SparsePrefillConfig())

q [total_q, Hq, D], k/v [total_k, Hkv, D] in the varlen layout of `terse.kernels.checks` (queries are the
last q_len of k_len tokens, so prefix-cache hits work); layer_patterns: one `HeadPattern` per query head
(`ModelPatterns.layer(i)`); out [total_q, Hq, D] in q's dtype.

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from terse.errors import ConfigError, KernelInputError
from terse.kernels.checks import SUPPORTED_HEAD_DIMS, check_block_size, check_varlen_inputs
from terse.kernels.estimate import EstimateConfig, estimate_vertical_slash
from terse.kernels.estimate_blocks import estimate_block_sparse
from terse.kernels.patterns import (
    PATTERN_KINDS,
    AShapePattern,
    BlockSparsePattern,
    HeadPattern,
    VerticalSlashPattern,
)
from terse.kernels.reference import a_shape_mask, block_sparse_mask, vertical_slash_mask


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
        if self.min_sparse_q_len < 1:
            raise ConfigError(f"min_sparse_q_len={self.min_sparse_q_len}; it must be >= 1")
        try:
            check_block_size("block_size_q", self.block_size_q)
            check_block_size("block_size_k", self.block_size_k)
        except KernelInputError as e:
            raise ConfigError(str(e)) from e
        if self.backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"backend={self.backend!r}; use 'auto', 'triton' or 'torch'")


def choose_prefill_path(q_len: int, config: SparsePrefillConfig) -> Literal["dense", "sparse"]:
    """Dense below `config.min_sparse_q_len` new query tokens, sparse from there on."""
    return "sparse" if q_len >= config.min_sparse_q_len else "dense"


class PrefillBatch(NamedTuple):
    """One call's inputs, handed whole to the per-kind runners."""

    q: torch.Tensor  # [total_q, Hq, D]
    k: torch.Tensor  # [total_k, Hkv, D]
    v: torch.Tensor  # [total_k, Hkv, D]
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float
    config: SparsePrefillConfig
    use_triton: bool

    def lengths(self) -> list[tuple[int, int]]:
        """(q_len, k_len) per sequence (host values)."""
        cq, ck = self.cu_seqlens_q.tolist(), self.cu_seqlens_k.tolist()
        return [(cq[b + 1] - cq[b], ck[b + 1] - ck[b]) for b in range(len(cq) - 1)]


def dense_attention(batch: PrefillBatch, out: torch.Tensor, seq_ids: Sequence[int] | None = None) -> None:
    """Dense causal attention (bottom-right aligned when q_len < k_len) into `out`, per sequence via SDPA."""
    cq, ck = batch.cu_seqlens_q.tolist(), batch.cu_seqlens_k.tolist()
    for b in range(len(cq) - 1) if seq_ids is None else seq_ids:
        q_len, k_len = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if q_len == 0:
            continue
        q_b = batch.q[cq[b] : cq[b + 1]].transpose(0, 1)[None]  # [1, Hq, q_len, D]
        k_b = batch.k[ck[b] : ck[b + 1]].transpose(0, 1)[None]  # [1, Hkv, k_len, D]
        v_b = batch.v[ck[b] : ck[b + 1]].transpose(0, 1)[None]
        if q_len == k_len:
            o = torch.nn.functional.scaled_dot_product_attention(
                q_b, k_b, v_b, is_causal=True, scale=batch.scale, enable_gqa=True
            )
        else:
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(q_len, k_len)
            o = torch.nn.functional.scaled_dot_product_attention(
                q_b, k_b, v_b, attn_mask=bias, scale=batch.scale, enable_gqa=True
            )
        out[cq[b] : cq[b + 1]] = o[0].transpose(0, 1)


TORCH_ROWS_PER_CHUNK = 2048  # query rows per SDPA call on the torch path (bounds the float mask it builds)


def _torch_masked(
    batch: PrefillBatch,
    head_ids: torch.Tensor,
    mask_of: Callable[[int, int, int, int], torch.Tensor],
    out: torch.Tensor,
) -> None:
    # mask_of(b, q_len, k_len, i) -> [1, q_len, k_len] bool for the i-th head of head_ids; one head at a
    # time and query rows in chunks keep memory at one head's mask instead of all heads'
    group = batch.q.shape[1] // batch.k.shape[1]
    cq, ck = batch.cu_seqlens_q.tolist(), batch.cu_seqlens_k.tolist()
    for b, (q_len, k_len) in enumerate(batch.lengths()):
        if q_len == 0:
            continue
        for i, head in enumerate(head_ids.tolist()):
            mask = mask_of(b, q_len, k_len, i)[0]  # [q_len, k_len]
            k_h = batch.k[ck[b] : ck[b + 1], head // group]  # [k_len, D]
            v_h = batch.v[ck[b] : ck[b + 1], head // group]
            for r in range(0, q_len, TORCH_ROWS_PER_CHUNK):
                rows = slice(cq[b] + r, cq[b] + min(r + TORCH_ROWS_PER_CHUNK, q_len))
                o = torch.nn.functional.scaled_dot_product_attention(
                    batch.q[rows, head], k_h, v_h, attn_mask=mask[r : r + TORCH_ROWS_PER_CHUNK], scale=batch.scale
                )  # [rows, D]
                out[rows, head] = o.nan_to_num(0.0).to(out.dtype)


def _run_a_shape(batch: PrefillBatch, head_ids: torch.Tensor, patterns: list[HeadPattern], out: torch.Tensor) -> None:
    # dense heads are a-shape heads whose window covers every key
    sinks = [p.num_sink_tokens if isinstance(p, AShapePattern) else 0 for p in patterns]
    windows = [p.window_len if isinstance(p, AShapePattern) else batch.max_seqlen_k + 1 for p in patterns]
    num_sink = torch.tensor(sinks, dtype=torch.int32, device=batch.q.device)
    window = torch.tensor(windows, dtype=torch.int32, device=batch.q.device)
    if batch.use_triton:
        from terse.kernels.a_shape import a_shape_attention

        a_shape_attention(
            batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
            batch.max_seqlen_k, num_sink, window, batch.scale, block_size_q=batch.config.block_size_q,
            block_size_k=batch.config.block_size_k, head_ids=head_ids, out=out,
        )
        return
    _torch_masked(
        batch, head_ids,
        lambda b, q_len, k_len, i: a_shape_mask(num_sink[i : i + 1], window[i : i + 1], q_len, k_len),
        out,
    )


def _budget(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _run_vertical_slash(
    batch: PrefillBatch, head_ids: torch.Tensor, patterns: list[HeadPattern], out: torch.Tensor
) -> None:
    vs = [p for p in patterns if isinstance(p, VerticalSlashPattern)]
    device, cfg = batch.q.device, batch.config
    vertical_idx, slash_idx = estimate_vertical_slash(
        batch.q, batch.k, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        _budget([p.num_vertical for p in vs], torch.int64, device),
        _budget([p.num_slash for p in vs], torch.int64, device),
        _budget([p.target_mass for p in vs], torch.float32, device),
        batch.scale, head_ids=head_ids, config=cfg.estimate,
    )
    if batch.use_triton:
        from terse.kernels.vertical_slash import vertical_slash_attention

        vertical_slash_attention(
            batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
            batch.max_seqlen_k, vertical_idx, slash_idx, batch.scale, block_size_q=cfg.block_size_q,
            block_size_k=cfg.block_size_k, head_ids=head_ids, out=out,
        )
        return
    _torch_masked(
        batch, head_ids,
        lambda b, q_len, k_len, i: vertical_slash_mask(
            vertical_idx[b, i : i + 1], slash_idx[b, i : i + 1], q_len, k_len, cfg.block_size_q, cfg.block_size_k
        ),
        out,
    )


def _run_block_sparse(
    batch: PrefillBatch, head_ids: torch.Tensor, patterns: list[HeadPattern], out: torch.Tensor
) -> None:
    bs = [p for p in patterns if isinstance(p, BlockSparsePattern)]
    device, cfg = batch.q.device, batch.config
    block_idx, block_count = estimate_block_sparse(
        batch.q, batch.k, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
        _budget([p.num_blocks for p in bs], torch.int64, device),
        _budget([p.target_mass for p in bs], torch.float32, device),
        batch.scale, block_size_q=cfg.block_size_q, block_size_k=cfg.block_size_k, head_ids=head_ids,
    )
    if batch.use_triton:
        from terse.kernels.block_sparse import block_sparse_attention

        block_sparse_attention(
            batch.q, batch.k, batch.v, batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q,
            batch.max_seqlen_k, block_idx, block_count, batch.scale, block_size_q=cfg.block_size_q,
            block_size_k=cfg.block_size_k, head_ids=head_ids, out=out,
        )
        return
    _torch_masked(
        batch, head_ids,
        lambda b, q_len, k_len, i: block_sparse_mask(
            block_idx[b, i : i + 1], block_count[b, i : i + 1], q_len, k_len, cfg.block_size_q, cfg.block_size_k
        ),
        out,
    )


Runner = Callable[[PrefillBatch, torch.Tensor, list[HeadPattern], torch.Tensor], None]

# pattern kind -> the runner for a group of heads of that kind (dense heads share the a-shape kernel)
RUNNERS: dict[str, Runner] = {
    "dense": _run_a_shape,
    "a_shape": _run_a_shape,
    "vertical_slash": _run_vertical_slash,
    "block_sparse": _run_block_sparse,
}


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
    """One layer's causal prefill attention with per-head sparse patterns -> out [total_q, Hq, D]."""
    config = config or SparsePrefillConfig()
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, head_dims=None)
    if len(layer_patterns) != q.shape[1]:
        raise KernelInputError(
            f"{len(layer_patterns)} head patterns for {q.shape[1]} query heads; pass one per query head "
            "(ModelPatterns.layer(i))"
        )
    for pattern in layer_patterns:
        if getattr(pattern, "kind", None) not in PATTERN_KINDS:
            raise KernelInputError(f"{pattern!r} is not a head pattern; use one of {sorted(PATTERN_KINDS)}")
    # auto: Triton on CUDA for the head dims it is compiled for, the torch path otherwise
    kernel_head_dim = q.shape[2] in SUPPORTED_HEAD_DIMS
    use_triton = config.backend == "triton" or (
        config.backend == "auto" and q.device.type == "cuda" and kernel_head_dim
    )
    batch = PrefillBatch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, config, use_triton)
    out = torch.empty_like(q)
    lengths = batch.lengths()
    dense_seqs = [b for b, (q_len, _) in enumerate(lengths) if choose_prefill_path(q_len, config) == "dense"]
    if len(dense_seqs) == len(lengths):
        dense_attention(batch, out)
        return out
    groups: dict[Runner, list[int]] = {}
    for head, pattern in enumerate(layer_patterns):
        groups.setdefault(RUNNERS[pattern.kind], []).append(head)
    for runner, heads in groups.items():
        head_ids = torch.tensor(heads, dtype=torch.int32, device=q.device)
        runner(batch, head_ids, [layer_patterns[h] for h in heads], out)
    if dense_seqs:
        dense_attention(batch, out, dense_seqs)
    return out
