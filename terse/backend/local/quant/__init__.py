"""INT4 weight-only quantization of the local engine's model (W4A16): round-to-nearest and AWQ at load
time, terse-quantized checkpoints, GPTQ / AWQ checkpoints; the products run through terse.kernels.

| module | holds |
|---|---|
| `config` | `QuantizationConfig` (bits, group size, scheme, AWQ, what to quantize, calibration) |
| `rtn` | round-to-nearest group-wise quantization into terse's INT4 layout |
| `calibration` | calibration samples and a dense float32 forward exposing each layer's projection inputs |
| `awq` | activation-aware scale search, folded into norms / producing projections |
| `modules` | `Int4Linear`, `Int4Embedding`, `ConcatLinear`: the layers dense ones are replaced by |
| `transform` | `quantize_model(model, config)`: the in-place transform of a loaded model |
| `checkpoint` | save / load terse-quantized safetensors (`quantization_config` in config.json) |
| `external` | GPTQ and AWQ (GEMM) checkpoints converted to terse's layout on load |
"""

from __future__ import annotations

from .config import QuantizationConfig

__all__ = ["QuantizationConfig"]
