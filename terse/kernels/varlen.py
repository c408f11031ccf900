"""The varlen layout: one validated description of where each sequence sits in flat q and k/v rows.

Every launcher, reference and estimator in this package takes a `VarlenBatch` (q, k, v and their
`VarlenLayout`), the same layout as flash-attn's varlen functions:

    q: [total_q, num_q_heads, head_dim]    sequence b owns rows cu_seqlens_q[b] : cu_seqlens_q[b + 1]
    k: [total_k, num_kv_heads, head_dim]   sequence b owns rows cu_seqlens_k[b] : cu_seqlens_k[b + 1]
    v: like k

A sequence's queries are the LAST q_len of its k_len >= q_len tokens of context (prefix-cache reuse), so
query i sits at absolute position k_len - q_len + i and sees keys 0 .. k_len - q_len + i:

    keys      0 1 2 3 4 5 6 7          k_len = 8, q_len = 3, offset = 5
    query 0   x x x x x x . .          (absolute position 5)
    query 1   x x x x x x x .
    query 2   x x x x x x x x

A layout is planned once (per engine step, say) and checked once, on construction; each layer then wraps
its own q/k/v with it in a `VarlenBatch`, which checks only the tensors against the layout. Lengths are
checked on the host when they are known there without a device read: always for
`VarlenLayout.from_lengths`, and for offsets that live on the CPU. Offsets built on the GPU by the caller
are trusted for q_len <= k_len and the max_seqlen bounds (reading them would force a synchronization).

Every failed check raises `KernelInputError` naming the tensor, what it is, what was expected and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from terse.errors import KernelInputError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True, eq=False)
class VarlenLayout:
    """Where each sequence of a varlen batch sits in the flat q and k/v rows. Frozen, validated once."""

    cu_seqlens_q: torch.Tensor
    """int32 [num_seqs + 1] starting at 0: sequence b's queries are rows cu_seqlens_q[b] : cu_seqlens_q[b + 1]."""
    cu_seqlens_k: torch.Tensor
    """int32 [num_seqs + 1] starting at 0, on the same device: sequence b's keys/values rows."""
    max_seqlen_q: int
    """The longest q_len (>= 1); sizes the launch grid, so it must not be below the true maximum."""
    max_seqlen_k: int
    """The longest k_len (>= max_seqlen_q)."""

    def __post_init__(self) -> None:
        for name, cu in (("cu_seqlens_q", self.cu_seqlens_q), ("cu_seqlens_k", self.cu_seqlens_k)):
            if cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 2:
                raise KernelInputError(
                    f"{name} is {cu.dtype} of shape {tuple(cu.shape)}; expected int32 [num_seqs + 1] "
                    "starting at 0 (torch.cumsum of the lengths, with a leading 0)"
                )
        if self.cu_seqlens_k.device != self.cu_seqlens_q.device:
            raise KernelInputError(
                f"cu_seqlens_k is on {self.cu_seqlens_k.device} but cu_seqlens_q is on "
                f"{self.cu_seqlens_q.device}; put both on the device of q"
            )
        if self.cu_seqlens_q.numel() != self.cu_seqlens_k.numel():
            raise KernelInputError(
                f"cu_seqlens_q has {self.cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                f"{self.cu_seqlens_k.numel()}; both must hold num_seqs + 1"
            )
        if self.max_seqlen_q < 1 or self.max_seqlen_k < self.max_seqlen_q:
            raise KernelInputError(
                f"max_seqlen_q={self.max_seqlen_q}, max_seqlen_k={self.max_seqlen_k}; expected "
                "1 <= max_seqlen_q <= max_seqlen_k"
            )
        if self.device.type == "cpu":
            _check_lengths(*self.host_offsets, self.max_seqlen_q, self.max_seqlen_k)

    @classmethod
    def from_lengths(
        cls, q_lens: Sequence[int], k_lens: Sequence[int], device: torch.device | str = "cpu"
    ) -> VarlenLayout:
        """The layout of sequences with these (host) lengths, offsets on `device`; checked on the host,
        so later host reads of the offsets cost no device synchronization, and sent to a GPU without
        waiting for it (an engine plans a step's layout while the step before still runs)."""
        if len(q_lens) != len(k_lens) or not q_lens:
            raise KernelInputError(
                f"{len(q_lens)} query lengths and {len(k_lens)} key lengths; pass one of each per sequence "
                "(at least one sequence)"
            )
        offsets_q, offsets_k = _offsets(q_lens), _offsets(k_lens)
        max_seqlen_q, max_seqlen_k = int(max(q_lens)), int(max(k_lens))
        _check_lengths(offsets_q, offsets_k, max_seqlen_q, max_seqlen_k)
        layout = cls(_offsets_tensor(offsets_q, device), _offsets_tensor(offsets_k, device), max_seqlen_q, max_seqlen_k)
        # seed the cache: the offsets are known here, never read back from the device
        layout.__dict__["host_offsets"] = (offsets_q, offsets_k)
        return layout

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch."""
        return self.cu_seqlens_q.numel() - 1

    @property
    def device(self) -> torch.device:
        """Where the offsets live (the device of q, k and v)."""
        return self.cu_seqlens_q.device

    @cached_property
    def host_offsets(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(cu_seqlens_q, cu_seqlens_k) as host ints; the first use reads them from the device once."""
        return tuple(self.cu_seqlens_q.tolist()), tuple(self.cu_seqlens_k.tolist())

    @property
    def offsets_known(self) -> bool:
        """True when the host offsets are available without a device read."""
        return "host_offsets" in self.__dict__ or self.device.type == "cpu"

    @property
    def lengths(self) -> list[tuple[int, int]]:
        """(q_len, k_len) per sequence (host values; see `host_offsets`)."""
        cq, ck = self.host_offsets
        return [(cq[b + 1] - cq[b], ck[b + 1] - ck[b]) for b in range(self.num_seqs)]

    def q_rows(self, b: int) -> slice:
        """Rows of q that hold sequence b's queries."""
        cq = self.host_offsets[0]
        return slice(cq[b], cq[b + 1])

    def k_rows(self, b: int) -> slice:
        """Rows of k and v that hold sequence b's keys and values."""
        ck = self.host_offsets[1]
        return slice(ck[b], ck[b + 1])

    def device_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_lens, k_lens) as int64 [num_seqs] tensors on the layout's device (no host read)."""
        q_lens = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).long()
        k_lens = (self.cu_seqlens_k[1:] - self.cu_seqlens_k[:-1]).long()
        return q_lens, k_lens


def _check_lengths(
    offsets_q: Sequence[int], offsets_k: Sequence[int], max_seqlen_q: int, max_seqlen_k: int
) -> None:
    if offsets_q[0] != 0 or offsets_k[0] != 0:
        raise KernelInputError("cu_seqlens_q and cu_seqlens_k must start at 0")
    for b in range(len(offsets_q) - 1):
        q_len, k_len = offsets_q[b + 1] - offsets_q[b], offsets_k[b + 1] - offsets_k[b]
        if q_len < 0 or q_len > k_len:
            raise KernelInputError(
                f"sequence {b} has q_len={q_len} > k_len={k_len} (or a negative length); queries are the "
                "last q_len of k_len context tokens, so 0 <= q_len <= k_len"
            )
        if q_len > max_seqlen_q or k_len > max_seqlen_k:
            raise KernelInputError(
                f"sequence {b} has q_len={q_len}, k_len={k_len} above max_seqlen_q={max_seqlen_q}, "
                f"max_seqlen_k={max_seqlen_k}; pass the true maxima"
            )


def _offsets_tensor(offsets: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """int32 offsets on `device`; to a GPU through pinned memory with a non-blocking copy (a pageable
    copy would make the host wait for every kernel queued before it)."""
    host = torch.tensor(offsets, dtype=torch.int32)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _offsets(lengths: Sequence[int]) -> tuple[int, ...]:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + int(n))
    return tuple(offsets)


@dataclass(frozen=True, eq=False)
class VarlenBatch:
    """One attention call's q, k, v in a `VarlenLayout`, checked against it once on construction.

    Estimators read only q and k; callers without values pass k as v.
    """

    q: torch.Tensor
    """[total_q, num_q_heads, head_dim], unit stride along head_dim."""
    k: torch.Tensor
    """[total_k, num_kv_heads, head_dim]; num_q_heads is a multiple of num_kv_heads (GQA)."""
    v: torch.Tensor
    """Like k."""
    layout: VarlenLayout
    """Where each sequence's rows are."""

    def __post_init__(self) -> None:
        q, k, v = self.q, self.k, self.v
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_qkv_tensor(name, t, q)
        if k.shape != v.shape:
            raise KernelInputError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; they must match")
        if k.shape[2] != q.shape[2]:
            raise KernelInputError(f"k head_dim {k.shape[2]} != q head_dim {q.shape[2]}; they must match")
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise KernelInputError(
                f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads; GQA needs "
                "num_q_heads % num_kv_heads == 0"
            )
        if self.layout.device != q.device:
            raise KernelInputError(f"the layout's offsets are on {self.layout.device} but q is on {q.device}; move them")
        if self.layout.offsets_known:
            cq, ck = self.layout.host_offsets
            if cq[-1] != q.shape[0] or ck[-1] != k.shape[0]:
                raise KernelInputError(
                    f"cu_seqlens end at q={cq[-1]}, k={ck[-1]} but q has {q.shape[0]} and k has {k.shape[0]} "
                    "rows; the last entry must equal the token count"
                )

    @classmethod
    def from_lengths(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: Sequence[int], k_lens: Sequence[int]
    ) -> VarlenBatch:
        """q/k/v of sequences with these host lengths (the layout built on q's device)."""
        return cls(q, k, v, VarlenLayout.from_lengths(q_lens, k_lens, q.device))

    @property
    def num_seqs(self) -> int:
        """Sequences in the batch."""
        return self.layout.num_seqs

    @property
    def num_q_heads(self) -> int:
        """Query heads."""
        return int(self.q.shape[1])

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads."""
        return int(self.k.shape[1])

    @property
    def head_dim(self) -> int:
        """Channels per head."""
        return int(self.q.shape[2])

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_q_heads // self.num_kv_heads


def _check_qkv_tensor(name: str, t: torch.Tensor, q: torch.Tensor) -> None:
    if t.dim() != 3:
        raise KernelInputError(
            f"{name} has shape {tuple(t.shape)}; expected 3 dims [tokens, heads, head_dim] "
            "(varlen layout: concatenate the sequences along dim 0)"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(f"{name} has dtype {t.dtype}; expected one of {SUPPORTED_DTYPES}: cast it")
    if t.stride(-1) != 1:
        raise KernelInputError(f"{name} has stride {t.stride(-1)} along head_dim; expected 1: pass {name}.contiguous()")
    if t.device != q.device or t.dtype != q.dtype:
        raise KernelInputError(
            f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}; put all on one device/dtype"
        )
