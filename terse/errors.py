"""Typed errors shared by every layer.

Each user-facing error names the offending value, the limit it broke and the fix. Catch `TerseError`
to catch everything terse raises on purpose; the `ValueError` subclasses are also plain `ValueError`s.
"""

from __future__ import annotations


class TerseError(Exception):
    """Base class of every error terse raises on purpose."""


class ConfigError(TerseError, ValueError):
    """A configuration value is invalid (raised when a config object is built)."""


class InvalidRequestError(TerseError, ValueError):
    """One request is invalid (too long, bad sampling values, empty prompt); other requests go on.

    `param` names the request field at fault when one is ("prompt", "max_tokens", "tokens"); the
    server reports it as the error's `param`.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelLoadError(TerseError):
    """A model could not be loaded: unknown path or name, unsupported architecture, corrupt files."""


class UnsupportedOperationError(TerseError):
    """The backend cannot do what was asked (for example `score()` on a server without logprobs)."""



class BackendUnavailableError(TerseError):
    """A remote backend could not be reached or kept failing after retries."""


class RetrievalIndexError(TerseError):
    """A retrieval index is missing, corrupt, or does not match the embedder (see terse.retrieval)."""


class BackendTimeoutError(BackendUnavailableError):
    """A remote backend accepted the connection but did not answer within the configured timeout."""


class RemoteRequestError(TerseError):
    """A remote backend rejected a request with an HTTP 4xx status; carries the server's own message.

    `status_code` is the HTTP status; `error_type`, `param` and `code` are the fields of the server's
    OpenAI-shaped error body when it sent one (else None).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.param = param
        self.code = code


class KernelInputError(TerseError, ValueError):
    """Tensors or indices passed to a kernel launcher have the wrong shape, dtype, stride or device."""
