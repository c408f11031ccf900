"""OpenAI-compatible HTTP server (`terse serve`): engine mode over any Backend, proxy mode over an upstream.

Needs the `server` extra (fastapi, uvicorn). This package's `__init__` imports neither, so the hook
interface (`hooks`, `schema`) stays usable without them (`terse.pipelines.wrap` relies on that).

    from terse.pipelines.server import engine_app, ServerThread
    with ServerThread(engine_app(load_backend("local:path/to/model"))) as server:
        ...  # OpenAI clients use base_url=f"{server.url}/v1"
"""

from __future__ import annotations

from terse.lazy import lazy_exports

_LAZY = {
    "create_app": "terse.pipelines.server.app",
    "engine_app": "terse.pipelines.server.build",
    "proxy_app": "terse.pipelines.server.build",
    "ServerThread": "terse.pipelines.server.runner",
    "ServerConfig": "terse.pipelines.server.config",
    "ProxyConfig": "terse.pipelines.server.config",
    "ChatHook": "terse.pipelines.server.hooks",
    "ChatResult": "terse.pipelines.server.hooks",
    "ChatRequest": "terse.pipelines.server.schema",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
__all__ = sorted(_LAZY)
