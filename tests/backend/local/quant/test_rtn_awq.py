"""Round-to-nearest quantization, calibration and the AWQ scale search."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from terse.backend.local.models.loader import load_model, read_model_config
from terse.backend.local.quant.awq import apply_awq, search_scale
from terse.backend.local.quant.calibration import PIECE_TOKENS, CalibrationForward, calibration_samples
from terse.backend.local.quant.config import QuantizationConfig
from terse.backend.local.quant.rtn import fake_quantize, quantize_weight
from terse.backend.tokenization import load_tokenizer
from terse.errors import ConfigError
from terse.kernels.w4a16_layout import dense_weight, unpack_int4

CPU = torch.device("cpu")


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_asym_round_to_nearest_error_is_half_a_step(group_size: int) -> None:
    w = torch.randn(24, 200) * 0.1
    w[:, 5] = 0.0
    q = quantize_weight(w, group_size, "asym", torch.float32)
    deq = dense_weight(q)  # [N, K]
    steps = q.scales.repeat_interleave(group_size, 0)[:200].t()
    assert ((deq - w).abs() <= steps / 2 + 1e-7).all()
    assert (deq[:, 5] == 0).all()  # zero stays exactly representable
    assert torch.equal(fake_quantize(w, group_size, "asym", torch.float32), deq)


def test_sym_maps_the_largest_magnitude_to_an_end_level() -> None:
    w = torch.randn(8, 64)
    w[3, 10] = -5.0  # the largest magnitude of its group, negative
    w[4, 40] = 6.0  # positive
    q = quantize_weight(w, 32, "sym", torch.float32)
    assert q.zeros is None
    deq = dense_weight(q)
    assert deq[3, 10] == pytest.approx(-5.0) and deq[4, 40] == pytest.approx(6.0)
    levels = unpack_int4(q.qweight)
    assert int(levels[10, 3]) == 0 and int(levels[40, 4]) == 0  # (0 - 8) * (m / -8) = m
    assert ((deq - w).abs() <= q.scales.abs().max() + 1e-6).all()


def test_scales_are_stored_in_the_activation_dtype() -> None:
    w = torch.randn(16, 64)
    q = quantize_weight(w, 32, "asym", torch.bfloat16)
    assert q.scales.dtype == torch.bfloat16 and q.zeros is not None and q.zeros.dtype == torch.bfloat16
    assert torch.equal(q.zeros, q.zeros.round())


def test_awq_search_protects_outlier_channels() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=gen)
    x[:, :4] *= 40.0  # a few channels carry large activations, as in real models
    w = torch.randn(96, 128, generator=gen) * 0.05
    config = QuantizationConfig(group_size=64)
    s, alpha, rtn_error, error = search_scale(x, w, config, torch.float32)
    assert alpha is not None and error < 0.7 * rtn_error
    assert s[:4].min() > s[4:].max()  # outlier channels get the largest scales


def test_awq_search_never_does_worse_than_round_to_nearest() -> None:
    x = torch.randn(64, 64)
    w = torch.randn(32, 64)
    _, _, rtn_error, error = search_scale(x, w, QuantizationConfig(group_size=32, awq_grid=3), torch.float32)
    assert error <= rtn_error


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


def test_calibration_samples_follow_the_budget(llama: Path) -> None:
    tok = load_tokenizer(llama)
    text = " ".join(["Alice works at Acme Corp in Paris."] * 200)
    samples = calibration_samples(QuantizationConfig(calibration_prompts=(text,), calibration_tokens=700), tok, CPU)
    assert [len(s) for s in samples] == [PIECE_TOKENS, 700 - PIECE_TOKENS]
    bundled = calibration_samples(QuantizationConfig(calibration_tokens=64), tok, CPU)
    assert sum(len(s) for s in bundled) == 64
    with pytest.raises(ConfigError, match="needs the model's tokenizer"):
        calibration_samples(QuantizationConfig(), None, CPU)


def test_awq_folding_keeps_the_dense_model_function(llama: Path) -> None:
    model = load_model(llama, read_model_config(llama), device=CPU, dtype=torch.float32)
    before = copy.deepcopy(model)
    tok = load_tokenizer(llama)
    config = QuantizationConfig(group_size=32, calibration_tokens=128)
    samples = calibration_samples(config, tok, CPU)
    choices = apply_awq(model, samples, config)
    assert {c.group for c in choices} == {"qkv", "gate_up", "down"}  # GQA model: no v -> o fold
    assert all(c.error <= c.rtn_error for c in choices) and any(c.alpha is not None for c in choices)
    probe = [torch.tensor(tok("The quick brown fox jumps over the lazy dog.").input_ids)]
    outputs = []
    for m in (before, model):
        forward = CalibrationForward(m, probe)
        for layer in m.decoder_layers:
            forward.step(layer)
        outputs.append(forward.hidden[0])
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    assert not torch.equal(before.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)


def test_awq_folds_o_proj_scales_into_v_without_gqa(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory("llama", num_kv_heads=4)  # as many kv heads as query heads
    model = load_model(path, read_model_config(path), device=CPU, dtype=torch.float32)
    before = copy.deepcopy(model)
    tok = load_tokenizer(path)
    config = QuantizationConfig(group_size=32, calibration_tokens=128)
    choices = apply_awq(model, calibration_samples(config, tok, CPU), config)
    assert "o" in {c.group for c in choices}
    probe = [torch.tensor(tok("Bob founded Globex in 1998.").input_ids)]
    hidden = []
    for m in (before, model):
        forward = CalibrationForward(m, probe)
        for layer in m.decoder_layers:
            forward.step(layer)
        hidden.append(forward.hidden[0])
    assert torch.allclose(hidden[0], hidden[1], rtol=1e-4, atol=1e-4)
