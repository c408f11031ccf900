"""Assemble an app for one mode: `engine_app(backend)` or `proxy_app(ProxyConfig(...))`."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI

from terse.backend.base import Backend
from terse.pipelines.server.app import create_app
from terse.pipelines.server.config import ProxyConfig, ServerConfig
from terse.pipelines.server.embeddings import EmbeddingService
from terse.pipelines.server.engine import EngineService
from terse.pipelines.server.hooks import ChatHook, HookChain
from terse.pipelines.server.proxy import ProxyService
from terse.retrieval.config import DEFAULT_EMBEDDER


def engine_app(
    backend: Backend,
    config: ServerConfig | None = None,
    hooks: Sequence[ChatHook] = (),
    *,
    embedding_model: str | None = DEFAULT_EMBEDDER,
) -> FastAPI:
    """Serve `backend` (the app closes it on shutdown).

    `embedding_model` (a sentence-transformers name or path; the bundled MiniLM by default; None for
    none) answers /v1/embeddings under that name; it loads on the first embeddings request.
    """
    config = config or ServerConfig()
    chain = HookChain(hooks)
    embedder = EmbeddingService(embedding_model) if embedding_model is not None else None
    return create_app(EngineService(backend, config, chain, embedder), config, chain)


def proxy_app(
    proxy: ProxyConfig,
    config: ServerConfig | None = None,
    hooks: Sequence[ChatHook] = (),
) -> FastAPI:
    """Forward to `proxy.upstream_url` after `hooks`; endpoints terse does not handle go upstream unchanged."""
    config = config or ServerConfig()
    chain = HookChain(hooks)
    return create_app(ProxyService(proxy, config, chain), config, chain)
