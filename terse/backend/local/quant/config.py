"""`QuantizationConfig`: how the local engine quantizes a model's weights when it loads them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from terse.errors import ConfigError

Scheme = Literal["sym", "asym"]
GROUP_SIZES = (32, 64, 128)
SHORTHANDS = ("int4",)


@dataclass(frozen=True)
class QuantizationConfig:
    """INT4 weight-only quantization (W4A16). Frozen; a bad value raises `ConfigError` naming the fix.

    The decoder's linear layers are always quantized; the embeddings and the LM head only when asked.
    Pre-quantized checkpoints (GPTQ, AWQ, terse) load with their own settings instead."""

    bits: int = 4
    """Bits per weight; only 4 is supported."""
    group_size: int = 128
    """Input channels sharing one scale (and zero point): 32, 64 or 128. Smaller groups are more
    accurate and cost more memory (one scale per group and output channel)."""
    scheme: Scheme = "asym"
    """"asym": a scale and an integer zero point per group (q - zero, q in [0, 15]); "sym": a scale
    only, zero point 8 (q - 8 in [-8, 7]), half the metadata and a little less accurate."""
    awq: bool = True
    """Activation-aware scales: per input channel, search a grid of scales that minimise each layer's
    output error on calibration activations, and fold them into the preceding norm or layer. False:
    plain round-to-nearest."""
    lm_head: bool = False
    """Quantize the LM head too (round-to-nearest): saves vocab x hidden x 1.5 bytes in bfloat16; the
    head of a tied-embedding model gets its own quantized copy unless `embeddings` is also set."""
    embeddings: bool = False
    """Quantize the token embeddings too (rows are dequantized as they are looked up)."""
    calibration_prompts: tuple[str, ...] = ()
    """Texts whose activations calibrate AWQ; empty: the documents of the bundled sample data."""
    calibration_tokens: int = 2048
    """Most calibration tokens used (texts are cut into pieces of at most 512 tokens)."""
    awq_grid: int = 20
    """Scale exponents tried per layer group (alpha in 0, 1/grid, ..., (grid - 1)/grid)."""

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise ConfigError(f"quantization bits={self.bits!r} is not supported; only 4-bit weights are")
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(f"quantization group_size={self.group_size!r} must be one of {GROUP_SIZES}")
        if self.scheme not in ("sym", "asym"):
            raise ConfigError(f"quantization scheme={self.scheme!r} must be 'sym' or 'asym'")
        for name in ("awq", "lm_head", "embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"quantization {name}={getattr(self, name)!r} must be true or false")
        prompts = self.calibration_prompts
        if isinstance(prompts, str) or not all(isinstance(p, str) and p for p in prompts):
            raise ConfigError(
                "quantization calibration_prompts must be a list of non-empty texts (or empty for the bundled sample)"
            )
        object.__setattr__(self, "calibration_prompts", tuple(prompts))
        if not isinstance(self.calibration_tokens, int) or self.calibration_tokens < 16:
            raise ConfigError(f"quantization calibration_tokens={self.calibration_tokens!r} must be an int >= 16")
        if not isinstance(self.awq_grid, int) or not 1 <= self.awq_grid <= 100:
            raise ConfigError(f"quantization awq_grid={self.awq_grid!r} must be an int in [1, 100] (20 is usual)")

    @classmethod
    def parse(cls, value: Any) -> QuantizationConfig | None:
        """None, "int4" (the defaults), a dict of fields (JSON / TOML configs) or a config -> a config."""
        if value is None or isinstance(value, QuantizationConfig):
            return value
        if isinstance(value, str):
            if value.lower() not in SHORTHANDS:
                raise ConfigError(
                    f"quantization={value!r} is not known; use 'int4' or a table of fields such as "
                    f"{{group_size = 64, scheme = 'sym'}}"
                )
            return cls()
        if isinstance(value, dict):
            data = dict(value)
            method = data.pop("method", "int4")
            if method not in SHORTHANDS:
                raise ConfigError(f"quantization method={method!r} is not known; use 'int4'")
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ConfigError(f"unknown quantization fields {unknown}; known: method, {', '.join(sorted(known))}")
            if isinstance(data.get("calibration_prompts"), list):
                data["calibration_prompts"] = tuple(data["calibration_prompts"])
            return cls(**data)
        raise ConfigError(
            f"quantization={value!r} must be 'int4', a table of fields or a QuantizationConfig"
        )
