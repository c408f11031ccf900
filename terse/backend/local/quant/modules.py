"""The quantized layers the model's dense ones are replaced by: `Int4Linear`, `Int4Embedding`, and
`ConcatLinear` (a fused projection whose parts cannot share one packed weight).

They keep the call signature of the modules they replace (`layer(x)`), so the model's forward runs
unchanged. On CUDA a product goes through `terse.kernels.w4a16.w4a16_matmul` (Triton); elsewhere the
weight is dequantized in the activation dtype and multiplied densely (the reference path).
"""

from __future__ import annotations

import torch
from torch import nn

from terse.kernels.row_prep import RowPrep
from terse.kernels.w4a16_layout import Int4Weight, dequantize, w4a16_reference


class Int4Linear(nn.Module):
    """y = x @ W + bias with W stored as INT4 (terse's layout): x [..., K] -> [..., N]."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        weight.check()
        self.group_size = weight.group_size
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.zeros: torch.Tensor | None
        self.input_perm: torch.Tensor | None
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        self.register_buffer("input_perm", weight.input_perm)
        self.bias = None if bias is None else nn.Parameter(bias.to(weight.scales.dtype), requires_grad=False)
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(self.bias.shape)}; expected [{self.out_features}]")

    @property
    def int4(self) -> Int4Weight:
        """The packed weight (views of this module's buffers)."""
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.input_perm)

    def forward(self, x: torch.Tensor, prep: RowPrep | None = None) -> torch.Tensor:
        """`prep`: x's `RowPrep` (one row, the span `row_prep_span` asked for), written by the kernel
        that wrote x; the CUDA product's column GEMV uses it, other paths ignore it."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if x2.is_cuda:
            from terse.kernels.w4a16 import w4a16_matmul

            if x2.dtype != self.scales.dtype or x2.stride(1) != 1:
                x2 = x2.to(self.scales.dtype).contiguous()
                prep = None  # the prep of another rounding of x
            # the weight was checked when this layer was built; x's shape comes from the reshape above
            out = w4a16_matmul(x2, self.int4, self.bias, check=False, prep=prep if x2.shape[0] == 1 else None)
        else:
            out = w4a16_reference(x2, self.int4, self.bias)
        return out.view(*lead, self.out_features)

    def row_prep_span(self, device: torch.device, dtype: torch.dtype) -> int:
        """The `RowPrep` span this layer's one-row product of a `dtype` x on `device` takes from the kernel
        that writes x: its group size, or 0 where its kernel works from x alone (not CUDA, another dtype,
        a plan that does not gain: `terse.kernels.w4a16.row_prep_span`)."""
        if device.type != "cuda" or dtype != self.scales.dtype:
            return 0
        from terse.kernels.w4a16 import row_prep_span

        return row_prep_span(device, dtype, self.int4)

    def silu_mul_forward(
        self, x: torch.Tensor, prep: RowPrep | None = None, prep_into: RowPrep | None = None
    ) -> torch.Tensor | None:
        """silu(gate) * up of self(x) = [gate | up] (this layer a fused gate/up projection) in the
        product's own launch where its kernel allows (one 16-bit row on CUDA running the column GEMV),
        else None: the caller applies the activation to self(x). x: [1, K] -> [1, N / 2]. `prep` as in
        `forward`; `prep_into`: `RowPrep` buffers per packed row ([1, N / 2]) the launch fills for the
        product after (unwritten when this returns None)."""
        if not x.is_cuda or x.dim() != 2 or x.shape[0] != 1 or x.dtype != self.scales.dtype or x.stride(1) != 1 \
                or x.shape[1] != self.in_features:
            return None
        from terse.kernels.w4a16 import w4a16_matmul_silu_mul

        # the weight was checked when this layer was built; x's shape, dtype and stride just above
        return w4a16_matmul_silu_mul(x, self.int4, self.bias, check=False, prep=prep, prep_into=prep_into)

    def rope_store_forward(
        self, x: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, positions: torch.Tensor,
        layer_kv: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(q, k, v) of this fused q/k/v projection with RoPE applied and k, v written into layer_kv, in
        the product's own launch where its kernel allows (one 16-bit row on CUDA running the column GEMV
        without split-K), else None: the caller projects, then rotates and stores. x: [1, K]."""
        if not x.is_cuda or x.dim() != 2 or x.shape[0] != 1 or x.dtype != self.scales.dtype or x.stride(1) != 1:
            return None
        from terse.kernels.w4a16 import w4a16_matmul_rope_store

        return w4a16_matmul_rope_store(x, self.int4, self.bias, cos_table, sin_table, positions, layer_kv, slot_mapping,
                                       num_heads, num_kv_heads)

    def extra_repr(self) -> str:
        scheme = "sym" if self.zeros is None else "asym"
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, {scheme}"


class Int4Embedding(nn.Module):
    """Token embeddings kept as an INT4 [hidden, vocab] weight: the LM head's layout, so a tied head can
    share the same buffers. A lookup dequantizes only the rows asked for."""

    def __init__(self, weight: Int4Weight) -> None:
        super().__init__()
        weight.check()
        if weight.input_perm is not None:
            raise ValueError("embeddings take no input permutation")
        self.group_size = weight.group_size
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.zeros: torch.Tensor | None
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)

    @property
    def int4(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.scales, self.zeros, self.group_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> [T, hidden] in the scales' dtype."""
        flat = input_ids.reshape(-1)
        cols = Int4Weight(
            self.qweight.index_select(1, flat).contiguous(),
            self.scales.index_select(1, flat).contiguous(),
            None if self.zeros is None else self.zeros.index_select(1, flat).contiguous(),
            self.group_size,
        )
        rows = dequantize(cols).t()  # [T, hidden]
        return rows.reshape(*input_ids.shape, -1)


class ConcatLinear(nn.Module):
    """Several projections of one input run side by side, outputs concatenated along the last dim (a
    fused q/k/v or gate/up whose quantized parts differ in layout, e.g. act-order permutations)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def concat_linears(parts: list[nn.Module]) -> nn.Module:
    """One module computing every part's output side by side: a single `Int4Linear` when the parts share
    group size, scheme and input permutation (their packed weights concatenate along N), else a
    `ConcatLinear`."""
    if all(isinstance(p, nn.Linear) for p in parts):
        return _concat_dense([p for p in parts if isinstance(p, nn.Linear)])
    if not all(isinstance(p, Int4Linear) for p in parts):
        return ConcatLinear(parts)
    q = [p for p in parts if isinstance(p, Int4Linear)]
    first = q[0]
    same = all(
        p.group_size == first.group_size
        and (p.zeros is None) == (first.zeros is None)
        and p.scales.dtype == first.scales.dtype
        and _same_perm(p.input_perm, first.input_perm)
        for p in q
    )
    if not same:
        return ConcatLinear(parts)
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in q if p.zeros is not None], dim=1)
    weight = Int4Weight(
        torch.cat([p.qweight for p in q], dim=1), torch.cat([p.scales for p in q], dim=1), zeros,
        first.group_size, first.input_perm,
    )
    biases = [p.bias for p in q]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([
            b.data if b is not None else torch.zeros(p.out_features, dtype=first.scales.dtype, device=first.qweight.device)
            for p, b in zip(q, biases)
        ])
    return Int4Linear(weight, bias)


def _concat_dense(parts: list[nn.Linear]) -> nn.Linear:
    first = parts[0]
    weight = torch.cat([p.weight.data for p in parts])
    fused = nn.Linear(first.in_features, weight.shape[0], bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias.data for p in parts if p.bias is not None]), requires_grad=False)
    return fused


def split_linear(module: nn.Module, sizes: list[int]) -> list[nn.Module]:
    """Undo `concat_linears` (or split a dense nn.Linear) along the output dim into parts of `sizes`."""
    if isinstance(module, ConcatLinear):
        return list(module.parts)
    if isinstance(module, Int4Linear):
        parts: list[nn.Module] = []
        start = 0
        for size in sizes:
            cols = slice(start, start + size)
            w = module.int4
            part = Int4Weight(
                w.qweight[:, cols].contiguous(), w.scales[:, cols].contiguous(),
                None if w.zeros is None else w.zeros[:, cols].contiguous(), w.group_size, w.input_perm,
            )
            parts.append(Int4Linear(part, None if module.bias is None else module.bias.data[cols]))
            start += size
        return parts
    assert isinstance(module, nn.Linear), f"cannot split {type(module).__name__}"
    out: list[nn.Module] = []
    for w, b in zip(module.weight.data.split(sizes), module.bias.data.split(sizes) if module.bias is not None else [None] * len(sizes)):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b, requires_grad=False)
        out.append(lin)
    return out


def _same_perm(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(torch.equal(a, b))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of `model` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
