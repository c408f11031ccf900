"""`terse serve` benchmarks: proxy overhead, and engine-mode throughput / TTFT.

1. Proxy overhead. A STUB UPSTREAM (benchmark harness only: a bare ASGI app that answers every chat
   request with a fixed completion, instantly, JSON or SSE) runs in its own process; a terse proxy
   (no hooks) in another forwards to it. The load generator (this process) sends the same requests
   to the stub directly and through the proxy, in alternating rounds, at 1 and 64 concurrent clients.
   Added latency = proxy percentile - direct percentile, from the same rounds.
2. Engine mode. `terse serve` over a tiny random Llama (hf:, and local: when importable) in its own
   process; N concurrent streaming clients for a fixed time; requests/s and TTFT (first content token).

    .venv/bin/python bench/server.py                    # both parts, CPU
    .venv/bin/python bench/server.py --part proxy --rounds 5

Prints a table last and writes raw numbers to bench/results/server.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Where does Alice work?"}]
STUB_TEXT = "Alice works at Acme Corp."


# -- the stub upstream (harness only) -----------------------------------------------------------------
def stub_app() -> Any:
    """A minimal OpenAI-compatible chat endpoint: a fixed answer, no model, no validation."""
    answer = json.dumps({
        "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": "stub",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": STUB_TEXT}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }).encode()
    chunks = [{"choices": [{"index": 0, "delta": {"content": w + " "}, "finish_reason": None}]} for w in STUB_TEXT.split()]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    stream = b"".join(b"data: " + json.dumps({"id": "s", "object": "chat.completion.chunk", **c}).encode() + b"\n\n"
                      for c in chunks) + b"data: [DONE]\n\n"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        streaming = b'"stream":true' in body.replace(b" ", b"")
        content, media = (stream, b"text/event-stream") if streaming else (answer, b"application/json")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", media), (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    return app


def run_role(role: str, port: int, target: str) -> None:
    import uvicorn

    if role == "stub":
        app = stub_app()
    elif role.startswith("proxy-"):
        from terse.pipelines.server import ProxyConfig, proxy_app

        app = proxy_app(ProxyConfig(upstream_url=target, transport=role.removeprefix("proxy-")))  # type: ignore[arg-type]
    else:
        from terse.backend import load_backend
        from terse.pipelines.server import ServerConfig, engine_app

        app = engine_app(load_backend(target), ServerConfig(served_model_names=("tiny",)))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", backlog=2048)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(role: str, target: str = "") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--role", role, "--port", str(port), "--target", target],
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code in (200, 404):
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{role} did not start")


# -- load generation ------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, url: str, model: str, stream: bool, max_tokens: int) -> tuple[float, float]:
    """(latency, time to first content delta) of one chat request, in seconds."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "ignore_eos": True}  # fixed-length answers, so tokens/s = requests x max_tokens
    start = time.perf_counter()
    if not stream:
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        response.raise_for_status()
        latency = time.perf_counter() - start
        return latency, latency
    first = None
    last = ""
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                first = time.perf_counter()
            last = line or last
    assert last == "data: [DONE]", last
    end = time.perf_counter()
    return end - start, (first or end) - start


async def closed_loop(url: str, model: str, num_clients: int, *, stream: bool, max_tokens: int,
                      num_requests: int | None = None, duration_s: float | None = None) -> dict[str, Any]:
    """`num_clients` clients each sending back-to-back requests until the count or the time is reached."""
    latencies: list[float] = []
    ttfts: list[float] = []
    failures: list[str] = []
    remaining = [num_requests if num_requests is not None else 1 << 30]
    deadline = time.perf_counter() + (duration_s if duration_s is not None else 1e9)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=num_clients)) as client:
        async def loop() -> None:
            while remaining[0] > 0 and time.perf_counter() < deadline:
                remaining[0] -= 1
                try:
                    latency, ttft = await one_request(client, url, model, stream, max_tokens)
                except (httpx.HTTPError, AssertionError) as e:
                    failures.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append(latency)
                ttfts.append(ttft)

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(num_clients)))
        elapsed = time.perf_counter() - t0
    return {"latencies": latencies, "ttfts": ttfts, "failures": failures, "elapsed_s": elapsed}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- the two parts -------------------------------------------------------------------------------------
def bench_proxy(rounds: int) -> list[dict[str, Any]]:
    stub, stub_url = start("stub")
    proxies = {t: start(f"proxy-{t}", f"{stub_url}/v1") for t in ("h11", "httpx")}
    sides = {"direct": (stub, stub_url), **{f"proxy-{t}": p for t, p in proxies.items()}}
    rows = []
    try:
        for stream in (False, True):
            for num_clients in (1, 64):
                n = 300 if num_clients == 1 else 1280
                samples: dict[str, list[float]] = {side: [] for side in sides}
                cpu_s = dict.fromkeys(sides, 0.0)
                failures: list[str] = []
                for _ in range(rounds):  # alternate so drift from machine load hits every side alike
                    for side, (proc, url) in sides.items():
                        cpu0 = cpu_seconds(proc.pid)
                        out = asyncio.run(closed_loop(url, "stub", num_clients, stream=stream, max_tokens=8, num_requests=n))
                        cpu_s[side] += cpu_seconds(proc.pid) - cpu0
                        failures += [f"{side}: {f}" for f in out["failures"]]
                        samples[side] += out["latencies"]
                for side in sides:
                    if side == "direct":
                        continue
                    row: dict[str, Any] = {"transport": side.removeprefix("proxy-"), "stream": stream,
                                           "num_clients": num_clients, "num_requests": len(samples[side]),
                                           "failures": failures,
                                           "stub_cpu_ms_per_request": cpu_s["direct"] / len(samples["direct"]) * 1e3,
                                           "proxy_cpu_ms_per_request": cpu_s[side] / len(samples[side]) * 1e3}
                    for q in (50, 99):
                        row[f"direct_p{q}_ms"] = pct(samples["direct"], q) * 1e3
                        row[f"proxy_p{q}_ms"] = pct(samples[side], q) * 1e3
                        row[f"added_p{q}_ms"] = row[f"proxy_p{q}_ms"] - row[f"direct_p{q}_ms"]
                    rows.append(row)
                    print(row, flush=True)
    finally:
        for proc, _ in (*proxies.values(), (stub, stub_url)):
            proc.terminate()
            proc.wait()
    return rows


def engine_specs(model_dir: Path) -> list[str]:
    specs = [f"hf:{model_dir}"]
    try:
        import terse.backend.local.engine  # noqa: F401
    except ImportError:
        pass
    else:
        specs.append(f"local:{model_dir}")
    return specs


def bench_engine(duration_s: float, max_tokens: int) -> list[dict[str, Any]]:
    from tests.tiny_models import build_tiny_model

    model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny-llama", "llama")
    rows = []
    for spec in engine_specs(model_dir):
        proc, url = start("engine", spec)
        try:
            asyncio.run(closed_loop(url, "tiny", 2, stream=True, max_tokens=max_tokens, num_requests=4))  # warm-up
            for num_clients in (1, 4, 16, 64):
                out = asyncio.run(closed_loop(url, "tiny", num_clients, stream=True, max_tokens=max_tokens,
                                              duration_s=duration_s))
                done = len(out["latencies"])
                row = {"backend": spec.split(":")[0], "num_clients": num_clients, "num_requests": done,
                       "failures": len(out["failures"]), "failure_kinds": sorted(set(out["failures"]))[:5], "requests_per_s": done / out["elapsed_s"],
                       "tokens_per_s": done * max_tokens / out["elapsed_s"],
                       "ttft_p50_ms": pct(out["ttfts"], 50) * 1e3, "ttft_p99_ms": pct(out["ttfts"], 99) * 1e3,
                       "latency_p50_ms": pct(out["latencies"], 50) * 1e3}
                rows.append(row)
                print(row, flush=True)
        finally:
            proc.terminate()
            proc.wait()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["proxy", "engine", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct/proxy rounds")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per engine-mode load level")
    parser.add_argument("--max-tokens", type=int, default=16, help="engine mode: tokens per answer (ignore_eos off)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        run_role(args.role, args.port, args.target)
        return
    import fastapi
    import torch
    import uvicorn

    out = Path(__file__).resolve().parent / "results" / "server.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}  # parts run apart merge
    results.update({
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "fastapi": fastapi.__version__,
                     "uvicorn": uvicorn.__version__, "httpx": httpx.__version__},
    })
    command = " ".join(["python", *sys.argv])
    for part, run in (("proxy", lambda: bench_proxy(args.rounds)),
                      ("engine", lambda: bench_engine(args.duration, args.max_tokens))):
        if args.part in (part, "all"):
            load_before = os.getloadavg()
            rows = run()
            results[part] = {"command": command, "load_average_before": load_before,
                             "load_average_after": os.getloadavg(), "rows": rows}
    out.write_text(json.dumps(results, indent=2))
    print(f"\nraw results: {out}")
    for row in results.get("proxy", {}).get("rows", []):
        print(f"proxy {row['transport']:5} stream={row['stream']!s:5} clients={row['num_clients']:3}  direct p50 {row['direct_p50_ms']:7.2f} ms"
              f"  proxy p50 {row['proxy_p50_ms']:7.2f} ms  added p50 {row['added_p50_ms']:6.2f} ms"
              f"  added p99 {row['added_p99_ms']:7.2f} ms  proxy CPU {row['proxy_cpu_ms_per_request']:5.2f} ms/req"
              f"  failures {len(row['failures'])}")
    for row in results.get("engine", {}).get("rows", []):
        print(f"engine {row['backend']:5} clients={row['num_clients']:3}  {row['requests_per_s']:6.2f} req/s"
              f"  {row['tokens_per_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:8.1f} ms  p99 {row['ttft_p99_ms']:8.1f} ms"
              f"  failures {row['failures']}")


if __name__ == "__main__":
    main()
