"""OpenAI-compatible HTTP server (`terse serve`): engine mode over any Backend, proxy mode over an upstream.

Needs the `server` extra (fastapi, uvicorn). This package's `__init__` imports neither, so the hook
interface (`hooks`, `schema`) stays usable without them (`terse.pipelines.wrap` relies on that).

    from terse.pipelines.server import engine_app, ServerThread
    with ServerThread(engine_app(load_backend("local:path/to/model"))) as server:
        ...  # OpenAI clients use base_url=f"{server.url}/v1"
"""

from __future__ import annotations

from terse.lazy import lazy_exports, lazy_names

_LAZY = {  # module -> the names it defines
    "terse.pipelines.server.app": ("create_app",),
    "terse.pipelines.server.build": ("engine_app", "proxy_app"),
    "terse.pipelines.server.thread": ("ServerThread",),
    "terse.pipelines.server.config": ("ServerConfig", "ProxyConfig"),
    "terse.pipelines.server.hooks": ("ChatHook", "ChatResult"),
    "terse.pipelines.server.schema": ("ChatRequest",),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
__all__ = lazy_names(_LAZY)
