"""Server settings: HTTP limits and auth (`ServerConfig`) and where proxy mode forwards to (`ProxyConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from terse.backend.openai_http import RetryPolicy
from terse.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """What every request must respect, in both engine and proxy mode."""

    host: str = "127.0.0.1"
    """Interface to bind; loopback by default so nothing is exposed unless asked (`--host 0.0.0.0`)."""
    port: int = 8000
    """TCP port; 0 picks a free one."""
    api_key: str | None = None
    """When set, every /v1 request and /tokenize must send `Authorization: Bearer <api_key>` (/health stays open)."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted; larger ones get 413."""
    max_messages: int = 1024
    """Most chat messages in one request."""
    max_tokens_limit: int = 32768
    """Largest max_tokens / max_completion_tokens one request may ask for."""
    default_max_tokens: int = 1024
    """max_tokens when the client gives none (engine mode; capped to what the context and, on the local
    engine, the KV pool have left for the prompt)."""
    max_n: int = 16
    """Most choices (`n`) per request."""
    served_model_names: tuple[str, ...] = ()
    """Engine mode: model ids clients may send (first one is listed by /v1/models); () = the backend's name."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port} must be in 0..65535 (0 picks a free port)")
        for name in ("max_body_bytes", "max_messages", "max_tokens_limit", "default_max_tokens", "max_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.api_key == "":
            raise ConfigError("api_key is empty; give a non-empty key or None to disable auth")


@dataclass(frozen=True)
class ProxyConfig:
    """Proxy mode: the OpenAI-compatible upstream requests are forwarded to."""

    upstream_url: str
    """Upstream API root including the version path, e.g. "https://api.openai.com/v1"."""
    upstream_api_key: str | None = None
    """Key sent upstream; None forwards the client's own Authorization header when terse has no api_key."""
    timeout_s: float = 600.0
    """Longest wait for any upstream byte (read timeout); exceeded before the first byte -> 504."""
    connect_timeout_s: float = 5.0
    """Longest wait to connect upstream; retried per `retry`, then 502."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Backoff for upstream failures before the first byte (connection errors, 429, 5xx)."""
    max_connections: int = 512
    """Pooled upstream connections (keep-alive) shared by all clients."""
    tokenizer: str | None = None
    """Tokenizer path/name for exact prompt accounting; None estimates ~4 characters per token."""
    transport: Literal["auto", "httpx", "h11"] = "auto"
    """Upstream HTTP client: "h11" (lean keep-alive pool, http:// only), "httpx" (any URL, https), "auto"
    (h11 for http://, httpx otherwise)."""

    def __post_init__(self) -> None:
        if not self.upstream_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"upstream_url={self.upstream_url!r} must start with http:// or https:// "
                f"(e.g. http://127.0.0.1:8001/v1)"
            )
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ConfigError(
                f"timeouts must be > 0 (timeout_s={self.timeout_s}, connect_timeout_s={self.connect_timeout_s})"
            )
        if self.transport not in ("auto", "httpx", "h11"):
            raise ConfigError(f"transport={self.transport!r} must be 'auto', 'httpx' or 'h11'")
        if self.transport == "h11" and not self.upstream_url.startswith("http://"):
            raise ConfigError(f"transport='h11' speaks plain http:// only; use 'httpx' for {self.upstream_url!r}")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections={self.max_connections} must be >= 1")
