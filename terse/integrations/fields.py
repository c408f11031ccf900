"""The compression fields of the pydantic-based adapters (LangChain's and LlamaIndex's components are
pydantic models): `CompressionFields` is mixed into `TerseCompressor` and `TerseNodePostprocessor`.
Imports pydantic, which both frameworks require; `common.py` stays framework- and pydantic-free.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, PrivateAttr

from terse.integrations.common import CompressionSettings, LazyCompressor


class CompressionFields(BaseModel):
    """A budget, an optional scorer and a token counter; the compressor is built on first use."""

    rate: float | None = None
    """Fraction of the texts' tokens to keep, in (0, 1] (0.5 when neither budget is given)."""
    target_tokens: int | None = None
    """Most tokens all kept texts may hold together (instead of `rate`)."""
    scorer: str | None = None
    """Backend spec of a scoring model (token-level pruning), e.g. "hf:path/to/model"; None: no model."""
    tokenizer: str | None = None
    """Hugging Face tokenizer that counts tokens (the reading model's); None: the scorer's, else words."""

    _compressor: LazyCompressor = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        settings = CompressionSettings.of(self.rate, self.target_tokens, self.scorer, self.tokenizer)
        self._compressor = LazyCompressor(settings)
