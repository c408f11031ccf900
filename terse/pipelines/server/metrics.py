"""`/metrics` in Prometheus text format (prometheus_client), every series prefixed `terse_`.

Two kinds of series:
- the server's own, counted as requests pass: requests by endpoint and status, their duration (to the
  last byte, streams included), and the prompt tokens the hooks saved (original / sent / saved);
- the engine's, read at scrape time from the backend's `stats` mapping (the local engine has one):
  requests running and waiting, KV blocks and their usage, preemptions, prefix-cache hit and query
  tokens, prefill and decode tokens, steps, speculative draft / accepted tokens. A backend without
  `stats` (proxy mode, HTTP backends) exports none of these.

Each app has its own registry, so several servers in one process never share series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from terse.pipelines.server.hooks import PromptAccounting

CONTENT_TYPE = CONTENT_TYPE_LATEST

ENDPOINTS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/tokenize", "/detokenize",
})
"""Paths counted under their own label; every other path counts as "other" (bounded label values)."""

# stats key -> (kind, series name without the prefix, help)
_ENGINE_SERIES: dict[str, tuple[str, str, str]] = {
    "num_running": ("gauge", "engine_requests_running", "Requests admitted to the engine (prefilling or decoding)."),
    "num_waiting": ("gauge", "engine_requests_waiting", "Requests queued for admission."),
    "num_kv_blocks": ("gauge", "engine_kv_blocks", "KV cache blocks in the pool."),
    "num_free_kv_blocks": ("gauge", "engine_kv_blocks_free", "KV cache blocks free."),
    "num_cached_kv_blocks": ("gauge", "engine_kv_blocks_cached", "KV cache blocks held by the prefix cache."),
    "num_preemptions": ("counter", "engine_preemptions", "Requests preempted (recomputed later) for lack of KV blocks."),
    "num_cached_tokens": ("counter", "engine_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache."),
    "num_admitted_prompt_tokens": ("counter", "engine_prefix_cache_query_tokens", "Prompt tokens admitted (looked up in the prefix cache)."),
    "num_prefill_tokens": ("counter", "engine_prefill_tokens", "Tokens computed in prefill."),
    "num_decode_tokens": ("counter", "engine_decode_tokens", "Tokens computed in decode steps."),
    "num_steps": ("counter", "engine_steps", "Engine steps run."),
    "num_failed_steps": ("counter", "engine_failed_steps", "Engine steps that failed (their requests failed)."),
    "num_kv_blocks_used": ("gauge", "engine_kv_blocks_used", "KV cache blocks held by requests or the prefix cache."),
    "num_device_inputs": ("counter", "engine_device_inputs", "Decode inputs taken on the device from the step before (overlapped with the host)."),
    "num_late_samples": ("counter", "engine_late_samples", "Constrained rows masked and sampled after the step before was collected."),
    "num_draft_tokens": ("counter", "engine_spec_draft_tokens", "Speculative decoding: draft tokens verified."),
    "num_accepted_tokens": ("counter", "engine_spec_accepted_tokens", "Speculative decoding: draft tokens accepted."),
    "num_verify_steps": ("counter", "engine_spec_verify_steps", "Speculative decoding: sequence-steps that verified a draft."),
    "num_voided_drafts": ("counter", "engine_spec_voided_drafts", "Speculative decoding: drafts built on a wrong guess of the step in flight."),
    "num_shadow_drafts": ("counter", "engine_spec_shadow_drafts", "Speculative decoding: drafts judged against the output without verifying (sequences on probation)."),
}


class _EngineCollector:
    """Turns a backend's `stats` mapping into metric families at scrape time."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, value in stats.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            kind, name, doc = _ENGINE_SERIES.get(key, ("gauge", f"engine_{key.removeprefix('num_')}", f"Engine {key}."))
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"terse_{name}", doc, value=value)
        total, free = stats.get("num_kv_blocks"), stats.get("num_free_kv_blocks")
        if isinstance(total, int) and isinstance(free, int) and total > 0:
            yield GaugeMetricFamily(
                "terse_engine_kv_cache_usage_ratio", "Share of KV cache blocks in use (0..1).", value=(total - free) / total
            )


class ServerMetrics:
    """The series of one app; `MetricsMiddleware` counts requests, `account()` the hooks' savings."""

    def __init__(self, engine_stats: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "terse_requests", "HTTP requests answered.", ["endpoint", "status"], registry=self.registry
        )
        self.duration = Histogram(
            "terse_request_duration_seconds",
            "Time from request to last response byte.",
            ["endpoint"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.prompt_original = Counter(
            "terse_prompt_tokens_original", "Chat prompt tokens as clients sent them.", registry=self.registry
        )
        self.prompt_sent = Counter(
            "terse_prompt_tokens_sent", "Chat prompt tokens sent to the model after the hooks.", registry=self.registry
        )
        self.prompt_saved = Counter(
            "terse_prompt_tokens_saved", "Chat prompt tokens the hooks removed.", registry=self.registry
        )
        if engine_stats is not None:
            self.registry.register(_EngineCollector(engine_stats))

    def account(self, accounting: PromptAccounting) -> None:
        self.prompt_original.inc(accounting.original_prompt_tokens)
        self.prompt_sent.inc(accounting.sent_prompt_tokens)
        self.prompt_saved.inc(max(accounting.saved_prompt_tokens, 0))

    def add_prompt_tokens(self, num_tokens: int) -> None:
        """Tokens a mode added to a prompt already accounted (engine mode's tool prompt): both the
        original and the sent count grow, the saving does not. Counters only grow: nothing else is added."""
        if num_tokens <= 0:
            return
        self.prompt_original.inc(num_tokens)
        self.prompt_sent.inc(num_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting and timing every HTTP request (to its last byte) into `metrics`."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/metrics":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        start, status = time.perf_counter(), 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - start)
