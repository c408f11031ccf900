"""terse's Llama-family forward over the paged KV cache: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Module and parameter names mirror the Hugging Face checkpoints (`model.layers.0.self_attn.q_proj.weight`,
...) so a safetensors state dict loads as is. Tokens of all sequences in a step travel flattened:
hidden states are [T, hidden] where T is the step's token count; the step's `AttentionPlan` knows which
token belongs to which sequence and where its KV lives. The elementwise work between the matrix
products (norms with the residual add, RoPE with the KV write, SiLU-and-multiply) goes through the
model's `ops` (models/ops.py): torch references or fused Triton kernels, chosen once.

The residual stream travels beside the hidden states so each norm can fuse the add before it:

    layer i:  h, res = norm(h + res)     (layer 0: h, res = norm(embed), embed)
              h = attention(h);  h, res = norm(h + res);  h = mlp(h)
    final:    out, _ = norm(h + res)

An INT4 fused projection of one row (batch-1 decode on CUDA) takes the elementwise work after it into
its own kernel where it can: q/k/v the RoPE + KV write (`ops.project_rope_store`), gate/up the
SiLU-and-multiply (`Int4Linear.silu_mul_forward`): two launches fewer per layer. Where an INT4 product
of one row gains from it, the kernel writing its input also writes the input side of its arithmetic (a
`RowPrep`, terse.kernels.row_prep): the norm before gate/up, and gate/up's store for down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from terse.backend.local.attention import AttentionPlan
from terse.backend.local.kv_cache import KVCachePool
from terse.backend.local.models.ops import LayerOps, TorchOps
from terse.backend.local.quant.modules import Int4Linear
from terse.errors import ModelLoadError
from terse.kernels.row_prep import PACKED_ROW, RowPrep, empty_prep

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    """None for plain RoPE; else a dict with "rope_type" ("linear" or "llama3") and its factors."""
    max_position_embeddings: int
    attention_bias: bool
    """Bias on the q/k/v projections (Qwen2; optional on Llama)."""
    qk_norm: bool
    """RMSNorm over head_dim on q and k before RoPE (Qwen3)."""
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Parse a config.json dict; raise `ModelLoadError` for an architecture terse does not run."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else str(cfg.get("model_type", "?"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"architecture {arch!r} is not supported by the local engine (supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}); run this model with an 'hf:<path-or-name>' spec"
            )
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = {**legacy, **{k: v for k, v in rope.items() if k != "rope_theta"}}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ModelLoadError(
                f"rope_type {rope_type!r} is not supported by the local engine (supported: default, "
                f"linear, llama3); run this model with an 'hf:<path-or-name>' spec"
            )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=None if rope_type == "default" else {**scaling, "rope_type": rope_type},
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float32) with the configured scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


_FP32_ANGLE_LIMIT = 1 << 15  # positions below this keep float32 angles, as the reference implementation


class RotaryEmbedding:
    """cos/sin tables [max_len, head_dim] (float32) for positions [0, max_len); the model's ops look
    them up per token (positions need not be sorted)."""

    def __init__(self, config: ModelConfig, max_len: int, device: torch.device) -> None:
        inv_freq = rope_inv_freq(config).to(device)
        positions = torch.arange(max_len, dtype=torch.float32, device=device)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_len, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
        self.cos = emb.cos()
        self.sin = emb.sin()
        if max_len > _FP32_ANGLE_LIMIT:
            # float32 angles lose ~p * 6e-8 rad; long (streaming) positions take float64 angles instead.
            far = torch.arange(_FP32_ANGLE_LIMIT, max_len, dtype=torch.float64, device=device)
            far_freqs = far[:, None] * inv_freq.double()[None, :]
            far_emb = torch.cat((far_freqs, far_freqs), dim=-1)
            self.cos[_FP32_ANGLE_LIMIT:] = far_emb.cos().float()
            self.sin[_FP32_ANGLE_LIMIT:] = far_emb.sin().float()


def _head_norm(ops: LayerOps, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """Per-head RMSNorm (Qwen3's q/k norm): x [T, heads, D] -> same shape."""
    num_tokens, num_heads, head_dim = x.shape
    out, _ = ops.rms_norm(x.reshape(num_tokens * num_heads, head_dim), None, norm.weight, norm.eps)
    return out.view(num_tokens, num_heads, head_dim)


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    first = linears[0]
    has_bias = first.bias is not None
    out_features = sum(lin.out_features for lin in linears)
    fused = nn.Linear(first.in_features, out_features, bias=has_bias, device="meta", dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
        if has_bias:
            fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return fused


def _split_into(
    state: dict[str, torch.Tensor], prefix: str, fused: str, names: tuple[str, ...], sizes: list[int]
) -> None:
    for kind in ("weight", "bias"):
        tensor = state.pop(f"{prefix}{fused}.{kind}", None)
        if tensor is not None:
            for name, part in zip(names, tensor.split(sizes)):
                state[f"{prefix}{name}.{kind}"] = part


class RMSNorm(nn.Module):
    """The norm's weight and epsilon; the math is the model's `ops.rms_norm`."""

    def __init__(self, dim: int, eps: float, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias, **kw)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias, **kw)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias, **kw)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False, **kw)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, device, dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, device, dtype) if c.qk_norm else None
        self.qkv_proj: nn.Linear | None = None  # set by fuse(): one GEMM instead of three

    def fuse(self) -> None:
        """Replace q/k/v projections by one concatenated projection (same results, fewer launches)."""
        self.qkv_proj = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, ops: LayerOps, rope: Any, kv: KVCachePool, attn: AttentionPlan) -> torch.Tensor:
        num_tokens = x.shape[0]
        layer_kv = kv.layer(self.layer_index)
        fused = None
        if self.qkv_proj is not None and self.q_norm is None:  # RoPE + KV write in the product's launch
            fused = ops.project_rope_store(self.qkv_proj, x, rope, layer_kv, attn.slot_mapping, self.num_heads,
                                           self.num_kv_heads)
        if fused is not None:
            q, k, v = fused
        else:
            q, k, v = self._project_rotate_store(x, ops, rope, layer_kv, attn)
        out = attn.attend(q, k, v, layer_kv, self.layer_index)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))

    def _project_rotate_store(
        self, x: torch.Tensor, ops: LayerOps, rope: Any, layer_kv: torch.Tensor, attn: AttentionPlan
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q/k/v projections, q/k norms, RoPE, and k, v written into layer_kv. -> (q, k, v)."""
        num_tokens = x.shape[0]
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.qkv_proj is not None:
            q_flat, k_flat, v_flat = self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q_flat, k_flat, v_flat = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q_flat.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k_flat.view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v_flat.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = _head_norm(ops, q, self.q_norm)
            k = _head_norm(ops, k, self.k_norm)
        q, k = ops.rope_store(rope, q, k, v, layer_kv, attn.slot_mapping)  # writes k, v into the pool
        return q, k, v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype, "bias": config.mlp_bias}
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, **kw)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up_proj = _concat_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def input_prep_span(self, x: torch.Tensor) -> int:
        """The `RowPrep` span the MLP's first product takes for x (one row of an INT4 gate/up), else 0."""
        proj = self.gate_up_proj
        if not isinstance(proj, Int4Linear) or x.shape[0] != 1:
            return 0
        return proj.row_prep_span(x.device, x.dtype)

    def forward(self, x: torch.Tensor, ops: LayerOps, prep: RowPrep | None = None) -> torch.Tensor:
        """`prep`: x's `RowPrep` (span from `input_prep_span`), written by the norm before."""
        if self.gate_up_proj is not None:
            act, act_prep = _gate_up_activation(self.gate_up_proj, x, ops, prep, self.down_proj)
            if act_prep is not None and isinstance(self.down_proj, Int4Linear):
                return self.down_proj(act, act_prep)
            return self.down_proj(act)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _gate_up_activation(
    proj: nn.Module, x: torch.Tensor, ops: LayerOps, prep: RowPrep | None = None, next_proj: nn.Module | None = None
) -> tuple[torch.Tensor, RowPrep | None]:
    """silu(gate) * up of the fused projection [gate | up] = proj(x): in the product's own launch where an
    INT4 layer's kernel allows it, else `ops.silu_mul` of the product. -> (activation, its `RowPrep` per
    packed row when the launch wrote one for `next_proj`, an INT4 product that takes it, else None)."""
    if isinstance(proj, Int4Linear):
        into = None
        if isinstance(next_proj, Int4Linear) and x.shape[0] == 1 and next_proj.row_prep_span(x.device, x.dtype):
            into = empty_prep(proj.out_features // 2, PACKED_ROW, x.device)
        act = proj.silu_mul_forward(x, prep, into)
        if act is not None:
            return act, into
        return ops.silu_mul(proj(x, prep)), None
    return ops.silu_mul(proj(x)), None


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_index, device, dtype)
        self.mlp = MLP(config, device, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, ops: LayerOps, rope: Any, kv: KVCachePool,
        attn: AttentionPlan,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] (the previous layer's output, or the embeddings); residual: the stream before
        it (None at layer 0). -> (this layer's MLP output, the residual stream before it)."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h, residual = ops.rms_norm(x, residual, norm1.weight, norm1.eps)
        h = self.self_attn(h, ops, rope, kv, attn)
        span = self.mlp.input_prep_span(h)
        if span:  # one row into an INT4 gate/up that gains from its input side worked out by the norm
            h, residual, prep = ops.rms_norm_prep(h, residual, norm2.weight, norm2.eps, span)
            return self.mlp(h, ops, prep), residual
        h, residual = ops.rms_norm(h, residual, norm2.weight, norm2.eps)
        return self.mlp(h, ops), residual


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, device, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)


class LlamaForCausalLM(nn.Module):
    """The whole model. `forward` runs the decoder over a flat token batch; `compute_logits` projects
    selected hidden rows to the vocabulary (only rows that sample or score pay for the lm_head)."""

    def __init__(self, config: ModelConfig, *, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config, device, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.rope: RotaryEmbedding | None = None
        self.ops: LayerOps = TorchOps()
        """The elementwise kernels (see models/ops.py); the engine may swap in the Triton ones."""
        self._head_prep: tuple[torch.Tensor, RowPrep] | None = None
        """(the latest forward's output, the `RowPrep` its final norm wrote for an INT4 LM head), or None."""

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.model.layers if isinstance(layer, DecoderLayer)]

    def fuse(self) -> None:
        """Fuse q/k/v and gate/up projections (after loading weights under the checkpoint's names)."""
        for layer in self.decoder_layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the checkpoint's (unfused) names; fused weights are returned as views."""
        state = dict(self.state_dict())
        c = self.config
        for i, layer in enumerate(self.decoder_layers):
            prefix = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            if attn.qkv_proj is not None:
                names = ("q_proj", "k_proj", "v_proj")
                sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim]
                _split_into(state, prefix + "self_attn.", "qkv_proj", names, sizes)
            if mlp.gate_up_proj is not None:
                _split_into(state, prefix + "mlp.", "gate_up_proj", ("gate_proj", "up_proj"), [c.intermediate_size] * 2)
        return state

    def setup_rope(self, max_len: int, device: torch.device) -> None:
        self.rope = RotaryEmbedding(self.config, max_len, device)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCachePool, attn: AttentionPlan
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final hidden states [T, hidden]. Writes the step's K/V into
        `kv` at `attn.slot_mapping`."""
        assert self.rope is not None, "setup_rope() must run before forward()"
        ops = self.ops
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        rope = ops.prepare_rope(self.rope, positions, x.dtype)
        residual: torch.Tensor | None = None
        for layer in self.decoder_layers:
            x, residual = layer(x, residual, ops, rope, kv, attn)
        norm, head = self.model.norm, self.lm_head
        span = head.row_prep_span(x.device, x.dtype) if isinstance(head, Int4Linear) and x.shape[0] == 1 else 0
        if span:  # one row into an INT4 LM head that gains from its input side worked out by the norm
            out, _, prep = ops.rms_norm_prep(x, residual, norm.weight, norm.eps, span)
            self._head_prep = (out, prep)
            return out
        self._head_prep = None
        out, _ = ops.rms_norm(x, residual, norm.weight, norm.eps)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in the model dtype (sampling upcasts what it needs:
        the argmax of the upcast is the argmax of these). On the very tensor the latest `forward`
        returned (the decode graphs' LM head, and the runner's for a step whose every row samples), an INT4
        head takes the `RowPrep` its final norm wrote."""
        head_prep = self._head_prep
        if head_prep is not None and head_prep[0] is hidden and isinstance(self.lm_head, Int4Linear):
            return self.lm_head(hidden, head_prep[1])
        logits: torch.Tensor = self.lm_head(hidden)
        return logits

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in float32."""
        return self.logits(hidden).float()
