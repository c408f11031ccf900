"""`terse quantize MODEL -o OUT`: quantize a model's weights to INT4 and save a terse-quantized
checkpoint that `local:OUT` loads directly; and the `--quantization*` flags `terse serve` shares.

    terse quantize path/to/model -o path/to/model-int4 --group-size 64 --calibration-file prompts.txt
    terse serve --model local:path/to/model --quantization int4 --quantization-group-size 64

Top-level imports stay light (no torch): the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from terse.backend.local.quant.config import GROUP_SIZES, QuantizationConfig
from terse.errors import ConfigError


def add_quantization_arguments(parser: argparse._ActionsContainer, prefix: str = "--quantization-") -> None:
    """The QuantizationConfig fields as flags named `<prefix>group-size`, `<prefix>scheme`, ... (all
    default to None: unset flags keep the config's defaults)."""
    parser.add_argument(f"{prefix}group-size", dest="quantization_group_size", type=int, choices=GROUP_SIZES,
                        help="input channels per scale (default 128)")
    parser.add_argument(f"{prefix}scheme", dest="quantization_scheme", choices=["asym", "sym"],
                        help="asym: scale + zero point per group (default); sym: scale only")
    parser.add_argument(f"{prefix}awq", dest="quantization_awq", action=argparse.BooleanOptionalAction,
                        help="activation-aware scales calibrated on sample text (default on; --no-...awq: "
                             "round-to-nearest)")
    parser.add_argument(f"{prefix}lm-head", dest="quantization_lm_head", action="store_true", default=None,
                        help="quantize the LM head too")
    parser.add_argument(f"{prefix}embeddings", dest="quantization_embeddings", action="store_true", default=None,
                        help="quantize the token embeddings too")
    parser.add_argument(f"{prefix}calibration-file", dest="quantization_calibration_file", type=Path,
                        action="append", help="a text file calibrating AWQ (repeatable; default: the bundled sample)")


def quantization_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The QuantizationConfig fields the flags set (only those given)."""
    fields: dict[str, Any] = {}
    for name in ("group_size", "scheme", "awq", "lm_head", "embeddings"):
        value = getattr(args, f"quantization_{name}", None)
        if value is not None:
            fields[name] = value
    files = getattr(args, "quantization_calibration_file", None) or []
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"calibration file {str(file)!r} cannot be read ({e}); give a readable text file") from e
    if texts:
        fields["calibration_prompts"] = tuple(texts)
    return fields


def quantization_options(args: argparse.Namespace) -> dict[str, Any]:
    """{"quantization": QuantizationConfig} from --quantization and its detail flags; {} without them."""
    fields = quantization_fields(args)
    if getattr(args, "quantization", None) is None:
        if fields:
            raise ConfigError("--quantization-* flags need --quantization int4")
        return {}
    return {"quantization": QuantizationConfig(**fields)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (or hub name) in Hugging Face layout")
    parser.add_argument("-o", "--output", type=Path, required=True, help="directory of the quantized checkpoint")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="activation dtype the scales are stored in (auto: bfloat16 on CUDA, float32 on CPU)")
    add_quantization_arguments(parser, prefix="--")


def run(args: argparse.Namespace) -> int:
    from terse.backend.local.build import resolve_device, resolve_dtype
    from terse.backend.local.config import EngineConfig
    from terse.backend.local.models.loader import load_model, read_model_config, resolve_model_dir
    from terse.backend.local.quant.checkpoint import save_quantized
    from terse.backend.local.quant.loading import read_quantization_config
    from terse.backend.local.quant.transform import quantize_model
    from terse.backend.tokenization import load_tokenizer

    config = QuantizationConfig(**quantization_fields(args))
    model_dir = resolve_model_dir(args.model)
    if read_quantization_config(model_dir) is not None:
        raise ConfigError(f"{args.model!r} is already quantized; give the dense model directory")
    engine_config = EngineConfig(device=args.device, dtype=args.dtype)
    device = resolve_device(engine_config)
    model = load_model(model_dir, read_model_config(model_dir), device=device, dtype=resolve_dtype(engine_config, device))
    report = quantize_model(model, config, tokenizer=load_tokenizer(model_dir))
    save_quantized(model, model_dir, args.output, config)
    awq = report.awq
    gain = sum(c.error for c in awq) / max(sum(c.rtn_error for c in awq), 1e-30) if awq else 1.0
    print(f"quantized {report.num_linear_layers} layers in {report.seconds:.1f} s: "
          f"{report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB"
          + (f"; AWQ output error {gain:.2f}x round-to-nearest's on the calibration text" if awq else ""))
    print(f"saved to {args.output} (serve it with: terse serve --model local:{args.output})")
    return 0
