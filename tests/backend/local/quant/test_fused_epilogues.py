"""The elementwise work after an INT4 fused projection, taken from the product's own launch where the
layer's kernel allows it (the kernels themselves are tested in tests/kernels), else done by the model's
ops on the plain product: the MLP's SiLU-and-multiply after gate/up, attention's RoPE + KV write after
q/k/v."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from terse.backend.local.models.llama import (
    Attention,
    DecoderLayer,
    LlamaForCausalLM,
    ModelConfig,
    _gate_up_activation,
)
from terse.backend.local.models.ops import TorchOps, TritonOps
from terse.backend.local.quant.modules import Int4Linear
from terse.backend.local.quant.rtn import quantize_weight
from terse.kernels.row_prep import RowPrep, row_prep_reference


def _gate_up_layer(inner: int = 24, hidden: int = 64) -> Int4Linear:
    torch.manual_seed(0)
    return Int4Linear(quantize_weight(torch.randn(2 * inner, hidden) / hidden**0.5, 32, "asym", torch.float32))


def test_on_the_cpu_the_ops_apply_the_activation_to_the_product() -> None:
    layer, ops = _gate_up_layer(), TorchOps()
    x = torch.randn(1, 64)
    assert layer.silu_mul_forward(x) is None  # no Triton kernel for CPU tensors
    assert layer.row_prep_span(x.device, x.dtype) == 0  # nor a row prep
    act, prep = _gate_up_activation(layer, x, ops, None, _gate_up_layer(inner=32, hidden=24))
    assert torch.equal(act, ops.silu_mul(layer(x))) and prep is None


def test_the_layer_s_own_activation_is_used_when_its_kernel_gives_one(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, ops = _gate_up_layer(), TorchOps()
    x = torch.randn(1, 64)
    fused = ops.silu_mul(layer(x)).clone()
    calls: list[tuple[torch.Tensor, RowPrep | None, RowPrep | None]] = []

    def from_kernel(self: Int4Linear, x: torch.Tensor, prep: RowPrep | None = None,
                    prep_into: RowPrep | None = None) -> torch.Tensor:
        calls.append((x, prep, prep_into))
        return fused

    monkeypatch.setattr(Int4Linear, "silu_mul_forward", from_kernel)
    act, prep = _gate_up_activation(layer, x, ops)
    assert act is fused and prep is None and calls == [(x, None, None)]
    dense = torch.nn.Linear(64, 48)  # not INT4: the ops path
    act, prep = _gate_up_activation(dense, x, ops)
    assert torch.equal(act, ops.silu_mul(dense(x))) and prep is None and len(calls) == 1


def test_the_activation_writes_a_row_prep_for_a_down_product_that_takes_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # gate/up [1, 64] -> [1, 24]; a down product asking for a prep gets buffers per packed row of the 24
    # activations, filled by the gate/up launch (here: a stand-in kernel that fills them as the store does)
    layer, down, ops = _gate_up_layer(), _gate_up_layer(inner=32, hidden=24), TorchOps()
    x = torch.randn(1, 64)

    def from_kernel(self: Int4Linear, x: torch.Tensor, prep: RowPrep | None = None,
                    prep_into: RowPrep | None = None) -> torch.Tensor:
        act = ops.silu_mul(self(x))
        if prep_into is not None:
            want = row_prep_reference(act, prep_into.span)
            prep_into.values.copy_(want.values)
            prep_into.sums.copy_(want.sums)
        return act

    monkeypatch.setattr(Int4Linear, "silu_mul_forward", from_kernel)
    monkeypatch.setattr(Int4Linear, "row_prep_span", lambda self, device, dtype: self.group_size)
    act, prep = _gate_up_activation(layer, x, ops, None, down)
    assert prep is not None and prep.span == 8 and prep.values.shape == (1, 24) and prep.sums.shape == (1, 3, 2)
    assert torch.equal(prep.values, act)
    assert _gate_up_activation(layer, torch.randn(2, 64), ops, None, down)[1] is None  # two rows: no prep


def test_the_norm_before_gate_up_writes_its_prep_and_the_mlp_passes_preps_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # the layer's second norm writes gate/up's prep when the MLP asks for one; gate/up and down receive
    # theirs; on the CPU the products ignore them, so the output equals the plain path's
    torch.manual_seed(1)
    cfg = _config()
    layer = DecoderLayer(cfg, 0, "cpu", torch.float32)
    layer.self_attn.fuse()
    layer.mlp.fuse()
    gate_up = layer.mlp.gate_up_proj
    assert isinstance(gate_up, torch.nn.Linear)
    layer.mlp.gate_up_proj = Int4Linear(quantize_weight(gate_up.weight.detach(), 32, "asym", torch.float32))
    layer.mlp.down_proj = Int4Linear(quantize_weight(layer.mlp.down_proj.weight.detach(), 32, "asym", torch.float32))
    x, residual = torch.randn(1, 32), torch.randn(1, 32)
    rope = (torch.ones(1, 1, 8), torch.zeros(1, 1, 8))
    plain = layer(x, residual, TorchOps(), rope, _Pool(), _Plan())

    seen: list[tuple[int, RowPrep | None]] = []
    forward = Int4Linear.forward

    def spy(self: Int4Linear, x: torch.Tensor, prep: RowPrep | None = None) -> torch.Tensor:
        seen.append((self.in_features, prep))
        return forward(self, x, prep)

    spans: list[int] = []

    class _PrepOps(TorchOps):
        def rms_norm_prep(self, x, residual, weight, eps, span):
            spans.append(span)
            return super().rms_norm_prep(x, residual, weight, eps, span)

    monkeypatch.setattr(Int4Linear, "row_prep_span", lambda self, device, dtype: self.group_size)
    monkeypatch.setattr(Int4Linear, "forward", spy)
    got = layer(x, residual, _PrepOps(), rope, _Pool(), _Plan())
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    assert spans == [32]
    gate_up_prep = next(p for k, p in seen if k == 32)
    assert gate_up_prep is not None and gate_up_prep.span == 32 and gate_up_prep.sums.shape == (1, 1, 2)


def _config(qk_norm: bool = False) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=64, attention_bias=False, qk_norm=qk_norm, mlp_bias=False, tie_word_embeddings=False,
        sliding_window=None, bos_token_id=None, eos_token_ids=(),
    )


class _Plan:
    slot_mapping = torch.tensor([3])

    def __init__(self) -> None:
        self.attended: tuple[torch.Tensor, ...] = ()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_kv: torch.Tensor, layer_index: int):
        self.attended = (q, k, v)
        return q


class _Pool:
    def __init__(self) -> None:
        self.kv = torch.zeros(2, 2, 4, 2, 8)

    def layer(self, index: int) -> torch.Tensor:
        return self.kv


class _FusedOps(TorchOps):
    """Torch ops whose projection step reports a fused result (and counts the calls)."""

    def __init__(self, result: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> None:
        self.result, self.calls, self.rope_calls = result, 0, 0

    def project_rope_store(self, proj, x, rope, layer_kv, slot_mapping, num_heads, num_kv_heads):
        self.calls += 1
        return self.result

    def rope_store(self, rope, q, k, v, layer_kv, slot_mapping):
        self.rope_calls += 1
        return super().rope_store(rope, q, k, v, layer_kv, slot_mapping)


def _attention(qk_norm: bool = False) -> Attention:
    torch.manual_seed(0)
    attention = Attention(_config(qk_norm), 0, "cpu", torch.float32)
    attention.fuse()
    return attention


def test_attention_takes_q_k_v_from_the_fused_projection_when_given() -> None:
    attention, plan = _attention(), _Plan()
    fused = (torch.randn(1, 4, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8))
    ops = _FusedOps(fused)
    rope = (torch.ones(1, 1, 8), torch.zeros(1, 1, 8))
    out = attention(torch.randn(1, 32), ops, rope, _Pool(), plan)
    assert ops.calls == 1 and ops.rope_calls == 0 and all(a is b for a, b in zip(plan.attended, fused))
    assert torch.equal(out, attention.o_proj(fused[0].reshape(1, 32)))


def test_attention_projects_and_rotates_itself_otherwise() -> None:
    for qk_norm, result in ((False, None), (True, (torch.zeros(1, 4, 8),) * 3)):  # q/k norm: never fused
        attention, plan = _attention(qk_norm), _Plan()
        ops = _FusedOps(result)
        x = torch.randn(1, 32)
        attention(x, ops, (torch.ones(1, 1, 8), torch.zeros(1, 1, 8)), _Pool(), plan)
        assert ops.rope_calls == 1 and ops.calls == (0 if qk_norm else 1)
        if not qk_norm:  # cos 1, sin 0: q is the projection's first 32 columns
            assert torch.allclose(plan.attended[0].reshape(1, -1), attention.qkv_proj(x)[:, :32])


def test_the_ops_fuse_only_int4_projections_on_the_gpu() -> None:
    layer = _gate_up_layer(inner=16, hidden=64)  # any INT4 layer: CPU tensors take no kernel
    rope = (torch.ones(64, 8), torch.zeros(64, 8), torch.tensor([0]))
    args = (torch.randn(1, 64), rope, torch.zeros(2, 2, 4, 2, 8), torch.tensor([0]), 2, 1)
    assert TorchOps().project_rope_store(layer, *args) is None
    assert TritonOps().project_rope_store(torch.nn.Linear(64, 32), *args) is None  # dense: the plain path
    assert TritonOps().project_rope_store(layer, *args) is None  # CPU tensors


def test_an_int4_lm_head_takes_the_final_norm_s_prep_on_the_forward_s_own_output(monkeypatch: pytest.MonkeyPatch) -> None:
    # the decode graphs run the head on exactly the tensor forward returned: that call gets the prep the
    # final norm wrote; any other tensor (rows selected from it, a two-row forward) goes without
    torch.manual_seed(2)
    cfg = replace(_config(), num_layers=0)
    model = LlamaForCausalLM(cfg, device="cpu", dtype=torch.float32)
    model.lm_head = Int4Linear(quantize_weight(torch.randn(8, 32), 32, "asym", torch.float32))
    model.setup_rope(16, torch.device("cpu"))
    seen: list[RowPrep | None] = []
    forward = Int4Linear.forward

    def spy(self: Int4Linear, x: torch.Tensor, prep: RowPrep | None = None) -> torch.Tensor:
        seen.append(prep)
        return forward(self, x, prep)

    monkeypatch.setattr(Int4Linear, "row_prep_span", lambda self, device, dtype: self.group_size)
    monkeypatch.setattr(Int4Linear, "forward", spy)
    out = model(torch.tensor([3]), torch.tensor([0]), None, None)  # no layers: no KV, no attention
    logits = model.logits(out)
    assert seen[-1] is not None and seen[-1].span == 32 and torch.equal(seen[-1].values, out)
    assert torch.equal(model.logits(out[:1]), logits) and seen[-1] is None  # another view: no prep
    model(torch.tensor([3, 4]), torch.tensor([0, 1]), None, None)
    assert model._head_prep is None


def test_a_one_row_step_gives_the_lm_head_the_forward_s_own_output(tiny_model_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the runner hands the LM head the forward's output itself when every row samples, so an INT4 head of a
    # one-row step gets the final norm's row prep in eager steps as in the decode graphs (CPU: the reference
    # prep, ignored by the product; tokens unchanged)
    from terse.backend.local.engine import LocalEngine
    from terse.backend.types import SamplingParams

    engine = LocalEngine.from_spec(str(tiny_model_factory("llama")), kv_block_size=4, num_kv_blocks=64,
                                   quantization={"group_size": 32, "awq": False, "lm_head": True})
    try:
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        plain = engine.generate(["a b c"], params)[0].token_ids
        head = engine.runner.model.lm_head
        assert isinstance(head, Int4Linear)
        calls: list[tuple[torch.Tensor, RowPrep | None]] = []
        forward = Int4Linear.forward

        def spy(self: Int4Linear, x: torch.Tensor, prep: RowPrep | None = None) -> torch.Tensor:
            if self is head:
                calls.append((x, prep))
            return forward(self, x, prep)

        monkeypatch.setattr(Int4Linear, "row_prep_span", lambda self, device, dtype: self.group_size)
        monkeypatch.setattr(Int4Linear, "forward", spy)
        assert engine.generate(["a b c"], params)[0].token_ids == plain
        assert len(calls) == 6  # the prompt's step (its uncached rows) and five decode steps
        for x, prep in calls[1:]:  # one row each: the head gets the norm's prep of exactly that row
            assert prep is not None and prep.span == 32 and torch.equal(prep.values, x)
    finally:
        engine.close()
