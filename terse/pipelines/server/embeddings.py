"""Engine mode's /v1/embeddings: any sentence-transformers model, the bundled MiniLM by default.

The model loads on the first request (a server that never embeds never pays for it) and runs in a
worker thread, one batch at a time. Inputs are embedded as documents (the model's "document" prompt,
if it has one), L2-normalized, as OpenAI's embeddings are. Nothing is cut silently: an input longer than
the model's window is refused with its length and the limit, and token-id inputs are refused (their ids
would be of some other tokenizer: OpenAI's clients send tiktoken ids).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from terse.pipelines.server.errors import ApiError, invalid
from terse.retrieval.config import DEFAULT_EMBEDDER, EmbedderConfig
from terse.retrieval.embedder import SentenceTransformerEmbedder

MAX_INPUTS = 2048
"""Most inputs in one request (OpenAI's limit)."""
_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


class EmbeddingService:
    """Embeds texts for /v1/embeddings with one sentence-transformers model, named `model_id`."""

    def __init__(self, model: str = DEFAULT_EMBEDDER, *, device: str = "cpu", model_id: str | None = None) -> None:
        self.embedder = SentenceTransformerEmbedder(EmbedderConfig(model=model, device=device))
        self.model_id = model_id or model
        """The id clients send as `model` (and /v1/models lists)."""
        self._lock = threading.Lock()  # one encode at a time: the model is shared, and batches are cheap

    def load(self) -> None:
        """Load the model now (the server otherwise loads it on the first request)."""
        with self._lock:
            _ = self.embedder.model

    def embed(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The OpenAI response body for a request body; raises `ApiError` for a bad one. Blocking."""
        texts, encoding, dimensions = self._parse(body)
        with self._lock:
            model = self.embedder.model
            window = int(model.max_seq_length or model.tokenizer.model_max_length)
            counts = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
            for i, count in enumerate(counts):
                if count > window:
                    raise invalid(
                        f"input[{i}] is {count} tokens; {self.model_id} reads at most {window}: split the text",
                        "input",
                        "context_length_exceeded",
                    )
            dim = self.embedder.dim
            if dimensions is not None and dimensions != dim:
                raise invalid(
                    f"'dimensions'={dimensions}: {self.model_id} embeds into {dim} dimensions and cannot shorten "
                    f"them; leave 'dimensions' out or send {dim}",
                    "dimensions",
                    "unsupported_parameter",
                )
            vectors = self.embedder.embed_documents(texts)  # [num_texts, dim] float32
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
            for i, vector in enumerate(vectors)
        ]
        num_tokens = sum(counts)
        return {
            "object": "list",
            "data": data,
            "model": self.model_id,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        }

    def _parse(self, body: Mapping[str, Any]) -> tuple[list[str], str, int | None]:
        unknown = sorted(set(body) - _FIELDS)
        if unknown:
            raise invalid(
                f"unrecognized request argument '{unknown[0]}'; /v1/embeddings accepts {sorted(_FIELDS)}",
                unknown[0],
                "unknown_parameter",
            )
        if body.get("model") != self.model_id:
            raise ApiError(
                404,
                f"embedding model {body.get('model')!r} is not served here; this server embeds with "
                f"{self.model_id!r} (GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        texts = _inputs(body.get("input"))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid(f"'encoding_format'={encoding!r} must be 'float' or 'base64'", "encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1):
            raise invalid(f"'dimensions'={dimensions!r} must be a positive integer", "dimensions", "invalid_type")
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            raise invalid(f"'user' must be a string, got {user!r}", "user", "invalid_type")
        return texts, encoding, dimensions


def _inputs(raw: Any) -> list[str]:
    texts: Sequence[Any] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else ()
    if not texts:
        raise invalid("'input' must be a non-empty string or a non-empty list of strings", "input", "invalid_type")
    if len(texts) > MAX_INPUTS:
        raise invalid(f"'input' has {len(texts)} entries; at most {MAX_INPUTS} per request", "input")
    for i, text in enumerate(texts):
        if isinstance(text, int | list) and not isinstance(text, bool):
            raise invalid(
                "'input' holds token ids; send text instead (ids of another tokenizer would embed the wrong "
                "text; LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)",
                "input",
                "invalid_type",
            )
        if not isinstance(text, str) or not text:
            raise invalid(f"input[{i}] must be a non-empty string, got {text!r}", "input", "invalid_type")
    return list(texts)


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32 bytes, as OpenAI's clients decode them
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
