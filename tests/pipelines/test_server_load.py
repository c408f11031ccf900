"""Load: 64 concurrent streaming clients against `terse serve` (engine mode, tiny model) for a bounded time.

Every request must succeed and every stream must end with `data: [DONE]`; latency percentiles are
printed (run with -s to see them), never asserted.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from terse.backend import load_backend
from terse.pipelines.server import ServerThread
from tests.pipelines.test_server import MESSAGES, MODEL, backend_specs, start_engine_server

NUM_CLIENTS = 64
DURATION_S = 4.0


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerThread]:
    scheme = backend_specs()[-1]  # the local engine when importable (continuous batching), else hf
    options = {"max_batch_size": 64} if scheme == "hf" else {}
    server = start_engine_server(load_backend(f"{scheme}:{tiny_llama}", **options))
    yield server
    server.stop()


async def one_stream(client: httpx.AsyncClient, url: str, ttfts: list[float], latencies: list[float]) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0.7, "stream": True}
    start = time.perf_counter()
    first: float | None = None
    lines: list[str] = []
    async with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line:
                if first is None and '"content":"' in line and '"content":""' not in line:
                    first = time.perf_counter()  # the first generated text, not the role chunk
                lines.append(line)
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        assert "error" not in json.loads(line.removeprefix("data: "))
    ttfts.append((first or time.perf_counter()) - start)
    latencies.append(time.perf_counter() - start)


async def run_clients(url: str) -> tuple[int, int, list[float], list[float]]:
    ttfts: list[float] = []
    latencies: list[float] = []
    failures: list[BaseException] = []
    deadline = time.perf_counter() + DURATION_S
    limits = httpx.Limits(max_connections=NUM_CLIENTS)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def loop() -> None:
            while time.perf_counter() < deadline:
                try:
                    await one_stream(client, url, ttfts, latencies)
                except Exception as e:  # counted, and the client goes on: the test reports them all
                    failures.append(e)

        await asyncio.gather(*(loop() for _ in range(NUM_CLIENTS)))
    assert not failures, failures[:3]
    return len(latencies), len(failures), ttfts, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def test_64_concurrent_streaming_clients(server: ServerThread) -> None:
    num_ok, num_failed, ttfts, latencies = asyncio.run(run_clients(f"{server.url}/v1/chat/completions"))
    assert num_failed == 0 and num_ok >= NUM_CLIENTS
    print(
        f"\n{NUM_CLIENTS} streaming clients, {DURATION_S:.0f} s: {num_ok} requests ({num_ok / DURATION_S:.1f}/s), "
        f"0 failed; latency p50 {percentile(latencies, 50) * 1e3:.0f} ms, p90 {percentile(latencies, 90) * 1e3:.0f} "
        f"ms, p99 {percentile(latencies, 99) * 1e3:.0f} ms; TTFT p50 {percentile(ttfts, 50) * 1e3:.0f} ms, "
        f"p99 {percentile(ttfts, 99) * 1e3:.0f} ms"
    )
    with httpx.Client() as client:  # and the server still answers afterwards
        assert client.get(f"{server.url}/health").status_code == 200
