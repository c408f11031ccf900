"""Assemble an app for one mode: `engine_app(backend)` or `proxy_app(ProxyConfig(...))`."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI

from terse.backend.base import Backend
from terse.pipelines.server.app import create_app
from terse.pipelines.server.config import ProxyConfig, ServerConfig
from terse.pipelines.server.engine import EngineService
from terse.pipelines.server.hooks import ChatHook, HookChain
from terse.pipelines.server.proxy import ProxyService


def engine_app(backend: Backend, config: ServerConfig | None = None, hooks: Sequence[ChatHook] = ()) -> FastAPI:
    """Serve `backend` (the app closes it on shutdown)."""
    config = config or ServerConfig()
    chain = HookChain(hooks)
    return create_app(EngineService(backend, config, chain), config, chain)


def proxy_app(
    proxy: ProxyConfig,
    config: ServerConfig | None = None,
    hooks: Sequence[ChatHook] = (),
) -> FastAPI:
    """Forward to `proxy.upstream_url` after `hooks`."""
    config = config or ServerConfig()
    chain = HookChain(hooks)
    return create_app(ProxyService(proxy, config, chain), config, chain)
