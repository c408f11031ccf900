"""OpenAI-shaped HTTP errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Everything the server rejects or fails on becomes an `ApiError`; `api_error_from()` maps terse's typed
errors onto statuses (bad request 400, remote 4xx passed through, upstream down 502, upstream slow 504).
`log_api_error()` logs one line per failed request: a client's mistake must never cost a traceback
(any client could fill the log with them).
"""

from __future__ import annotations

import logging
from typing import Any

from terse.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidRequestError,
    RemoteRequestError,
    TerseError,
    UnsupportedOperationError,
)

_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    504: "upstream_timeout_error",
}


class ApiError(Exception):
    """An error the server answers with: an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type or _TYPE_OF_STATUS.get(status_code, "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        }


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """A 400 for a request field the client got wrong."""
    return ApiError(400, message, param=param, code=code)


def api_error_from(e: Exception) -> ApiError:
    """The HTTP answer for an exception raised while serving a request (unknown ones are 500s)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidRequestError):
        return invalid(str(e), e.param, code="invalid_request")
    if isinstance(e, UnsupportedOperationError):
        return invalid(str(e), code="invalid_request")
    if isinstance(e, RemoteRequestError):
        return ApiError(e.status_code, str(e), error_type=e.error_type, param=e.param, code=e.code)
    if isinstance(e, BackendTimeoutError):
        return ApiError(504, f"the model server did not answer in time: {e}", code="upstream_timeout")
    if isinstance(e, BackendUnavailableError):
        return ApiError(502, f"the model server is unavailable: {e}", code="upstream_unavailable")
    if isinstance(e, TerseError):  # raised on purpose, with a message written for the user (no template, ...)
        return ApiError(500, str(e), code="server_error")
    return ApiError(500, f"internal error ({type(e).__name__}); see the server log", code="internal_error")


def log_api_error(logger: logging.Logger, request_id: str, error: ApiError) -> None:
    """One line for a failed request: INFO for the client's errors (4xx), WARNING for the server's."""
    level = logging.INFO if error.status_code < 500 else logging.WARNING
    param = f" ({error.param})" if error.param else ""
    logger.log(level, "request %s: %d %s%s: %s", request_id, error.status_code, error.code, param, error.message)
