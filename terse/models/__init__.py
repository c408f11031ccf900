"""Model files shipped inside the package (see `reference/README.md` for what the model is)."""

from __future__ import annotations

from pathlib import Path

from terse.errors import ModelLoadError

_REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def reference_model_path() -> Path:
    """Directory of the bundled reference model; load it with `from_pretrained(path)` or
    `terse.load_backend(f"hf:{path}")`. Raises `ModelLoadError` when the weights are missing."""
    if not (_REFERENCE_DIR / "model.safetensors").is_file():
        raise ModelLoadError(
            f"the reference model is missing from {_REFERENCE_DIR} (no model.safetensors); reinstall terse, "
            f"or train one with bench/train_reference.py and copy its output there"
        )
    return _REFERENCE_DIR
