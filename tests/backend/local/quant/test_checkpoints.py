"""Quantized checkpoints: terse's own (save, then load back), and GPTQ / AWQ layouts packed here by
reference packers written from the layouts' published descriptions (not from terse's code). Each loaded
engine is compared token for token with transformers on the dense weights the packed values stand for."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from terse.backend import load_backend
from terse.backend.local.engine import LocalEngine
from terse.backend.local.quant.checkpoint import save_quantized
from terse.backend.local.quant.config import QuantizationConfig
from terse.backend.local.quant.modules import ConcatLinear, Int4Embedding, Int4Linear
from terse.backend.types import SamplingParams
from terse.errors import ConfigError, ModelLoadError
from terse.models import reference_model_path
from tests.backend.local.helpers import Reference, mixed_prompts

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble i of a word holds column 8c + AWQ_ORDER[i]


def to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_gptq_rows(q: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight: int32 [K / 8, N], word [r, n] = sum_j q[8r + j, n] << 4j."""
    k, n = q.shape
    words = torch.zeros(k // 8, n, dtype=torch.int64)
    for j in range(8):
        words |= q[j::8].long() << (4 * j)
    return to_int32(words)


def pack_gptq_cols(z: torch.Tensor) -> torch.Tensor:
    """GPTQ qzeros: int32 [G, N / 8], word [g, c] = sum_j z[g, 8c + j] << 4j."""
    g, n = z.shape
    words = torch.zeros(g, n // 8, dtype=torch.int64)
    for j in range(8):
        words |= z[:, j::8].long() << (4 * j)
    return to_int32(words)


def pack_awq_cols(q: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM: int32 [R, N / 8], word [r, c] = sum_i q[r, 8c + AWQ_ORDER[i]] << 4i."""
    r, n = q.shape
    words = torch.zeros(r, n // 8, dtype=torch.int64)
    for i, col in enumerate(AWQ_ORDER):
        words |= q[:, col::8].long() << (4 * i)
    return to_int32(words)


def write_external(src: Path, out: Path, dense_out: Path, method: str, seed: int, *, desc_act: bool = False,
                   v2: bool = False, group_size: int = 32) -> None:
    """A GPTQ or AWQ checkpoint of random INT4 values for every projection of `src`, and a dense
    checkpoint of the weights they stand for."""
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src / "model.safetensors"))
    packed, dense = dict(tensors), dict(tensors)
    names = sorted(n.removesuffix(".weight") for n in tensors if any(n.endswith(f"{p}.weight") for p in PROJECTIONS))
    for name in names:
        n, k = tensors[f"{name}.weight"].shape
        groups = k // group_size
        q = torch.randint(0, 16, (k, n), generator=gen)
        z = torch.randint(1, 16, (groups, n), generator=gen)
        s = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).half()
        g_idx = torch.arange(k) // group_size
        if desc_act:  # act order: row order[i] was quantized i-th, in group i // group_size
            order = torch.randperm(k, generator=gen)
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[order] = torch.arange(k) // group_size
        w = s.float()[g_idx] * (q - z[g_idx]).float()  # [K, N]
        dense[f"{name}.weight"] = w.t().contiguous()
        del packed[f"{name}.weight"]
        if method == "gptq":
            packed[f"{name}.qweight"] = pack_gptq_rows(q)
            packed[f"{name}.qzeros"] = pack_gptq_cols(z if v2 else z - 1)
            packed[f"{name}.g_idx"] = g_idx.to(torch.int32)
        else:
            packed[f"{name}.qweight"] = pack_awq_cols(q)
            packed[f"{name}.qzeros"] = pack_awq_cols(z)
        packed[f"{name}.scales"] = s
    config = json.loads((src / "config.json").read_text())
    for directory, state in ((out, packed), (dense_out, dense)):
        directory.mkdir(parents=True)
        for f in src.iterdir():
            if f.suffix != ".safetensors" and f.name != "config.json":
                (directory / f.name).write_bytes(f.read_bytes())
        save_file(state, str(directory / "model.safetensors"))
        cfg = dict(config)
        if directory == out:
            cfg["quantization_config"] = (
                {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act, "sym": False,
                 "checkpoint_format": "gptq_v2" if v2 else "gptq"}
                if method == "gptq" else
                {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
            )
        (directory / "config.json").write_text(json.dumps(cfg))


def assert_same_as_transformers(engine: LocalEngine, ref: Reference, num_prompts: int = 6) -> None:
    prompts = mixed_prompts(num_prompts, seed=9)
    outs = engine.generate(prompts, SamplingParams(max_tokens=8))
    for prompt, out in zip(prompts, outs):
        assert list(out.token_ids) == ref.greedy(prompt, 8, sorted(engine.eos_token_ids)), prompt


@pytest.mark.parametrize(
    ("arch", "method", "desc_act", "v2"),
    [("llama", "gptq", False, False), ("llama", "gptq", True, False), ("qwen2", "gptq", False, True),
     ("llama", "awq", False, False), ("qwen3", "awq", False, False)],
)
def test_external_checkpoint_matches_transformers_on_its_dense_weights(
    tiny_model_factory: Callable[..., Path], tmp_path: Path, arch: str, method: str, desc_act: bool, v2: bool
) -> None:
    src = tiny_model_factory(arch)
    write_external(src, tmp_path / "q", tmp_path / "dense", method, seed=len(arch), desc_act=desc_act, v2=v2)
    engine = LocalEngine.from_spec(str(tmp_path / "q"), num_kv_blocks=128)
    try:
        attn = engine.runner.model.decoder_layers[0].self_attn
        if desc_act:  # q/k/v quantized with different act orders cannot share one packed weight
            assert isinstance(attn.qkv_proj, ConcatLinear)
        else:
            assert isinstance(attn.qkv_proj, Int4Linear)
        assert_same_as_transformers(engine, Reference(tmp_path / "dense"))
    finally:
        engine.close()


def test_terse_checkpoint_round_trip_with_tied_quantized_embeddings(tmp_path: Path) -> None:
    src = reference_model_path()
    quantization = QuantizationConfig(group_size=64, lm_head=True, embeddings=True, calibration_tokens=256)
    first = LocalEngine.from_spec(str(src), num_kv_blocks=64, quantization=quantization)
    model = first.runner.model
    assert isinstance(model.lm_head, Int4Linear) and isinstance(model.model.embed_tokens, Int4Embedding)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight  # tied: one packed weight
    out = save_quantized(model, src, tmp_path / "int4", quantization)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "terse" and saved["group_size"] == 64 and saved["awq"] is True
    assert "lm_head.qweight" not in load_file(str(out / "model.safetensors"))
    assert (out / "tokenizer.json").is_file()
    second = load_backend(f"local:{out}", num_kv_blocks=64, quantization={"group_size": 64})
    try:
        prompt = [first.render_chat([{"role": "user", "content": "Where does Alice work?"}])]
        params = SamplingParams(max_tokens=12)
        assert first.generate(prompt, params)[0].token_ids == second.generate(prompt, params)[0].token_ids
        with pytest.raises(ConfigError, match="already quantized with group size"):
            load_backend(f"local:{out}", num_kv_blocks=64, quantization={"group_size": 32})
    finally:
        first.close()
        second.close()


def test_unreadable_quantized_checkpoints_fail_clearly(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model_factory("llama")
    write_external(src, tmp_path / "q", tmp_path / "dense", "awq", seed=1)
    config_path = tmp_path / "q" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["version"] = "gemv"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'gemm' packing"):
        LocalEngine.from_spec(str(tmp_path / "q"), num_kv_blocks=16)
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="hf:<path>"):
        LocalEngine.from_spec(str(tmp_path / "q"), num_kv_blocks=16)
