"""Chat layouts: compression where chat apps already put their documents, through the real proxy.

    .venv/bin/python bench/chat_layouts.py [--worlds 4] [--first-world 2] [--ratios 2,4,8] [--per-world N]
        [--part all|accuracy|overhead|profile [--unseen]|spans|table]

Workload ("chat-layouts" in BENCHMARKS.md): the synthetic doc-QA test split, worlds 2-5 (the
compression bench uses worlds 0-1), single-hop, multi-hop and list questions, each with its full
context (gold documents among distractors, ~3K tokens), sent as a chat request in four layouts:

    system    documents in the system turn as <documents><document id=...> tags; the question alone
    user      documents + question in one user turn: "Documents:\\n[id] text ...\\n\\nQuestion: ..."
    tool      question, an assistant tool_calls turn, and a tool result: JSON [{id, title, text}, ...]
    earlier   documents under markdown headings in an earlier user turn; an assistant reply; the question

Path of every request: openai client -> `terse serve --upstream` (a subprocess of the real CLI, with
`--compress --compress-rate 1/r --tokenizer <reference model>`; without `--compress` for the
uncompressed baseline) -> a recorder (this process: keeps the forwarded body) -> the engine server
over the reference model (a subprocess serving `engine_app(load_backend("local:<reference>"))`, as
`terse serve --model` does, with a small KV pool: the CLI has no pool-size flag and on CPU claims 85%
of free RAM). Greedy answers, exact match against the gold answer.

Measured per layout and ratio: tokens forwarded / original (the proxy's x-terse-* headers: reference
tokenizer, chat template), gold answer kept in the forwarded messages, exact match vs the uncompressed
request in the same layout, with the answers lost and gained and a paired 95% interval. Overhead: the
same ~3K-token requests, one at a time, to an instant stub upstream directly and through proxies with and
without compression, alternating; added latency = proxy p50 - direct p50; in process, the compress hook
alone on requests seen before and on unseen ones (caches cleared). `--part profile` prints a cProfile of
the hook on those requests. Targets at 4x: <= 35% forwarded, >= 90% kept, EM within 2 points; overhead
<= 10 ms p50. Raw numbers: bench/results/chat_layouts.json (and chat_layouts_overhead.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from terse.answer_match import exact_match  # noqa: E402
from terse.organize.formats import QA_SYSTEM  # noqa: E402
from terse.synth import SplitConfig, build_split  # noqa: E402
from terse.synth.dataset import SplitData  # noqa: E402
from terse.synth.questions import Question  # noqa: E402

LAYOUTS = ("system", "user", "tool", "earlier")
KINDS = ("single", "multi", "list")
MODEL = "reference"
Messages = list[dict[str, Any]]


# -- the four layouts --------------------------------------------------------------------------------------
def layout_messages(layout: str, q: Question, data: SplitData) -> Messages:
    docs = [data.document(i) for i in q.context_doc_ids]
    if layout == "system":
        tagged = "\n".join(f'<document id="{d.doc_id}">\n{d.text}\n</document>' for d in docs)
        return [{"role": "system", "content": f"{QA_SYSTEM}\n\n<documents>\n{tagged}\n</documents>"},
                {"role": "user", "content": q.question}]
    if layout == "user":
        body = "\n\n".join(f"[{d.doc_id}] {d.text}" for d in docs)
        return [{"role": "system", "content": QA_SYSTEM},
                {"role": "user", "content": f"Documents:\n{body}\n\nQuestion: {q.question}"}]
    if layout == "tool":
        call = {"id": f"call_{q.qid}", "type": "function",
                "function": {"name": "search_documents", "arguments": json.dumps({"query": q.question})}}
        results = json.dumps([{"id": d.doc_id, "title": d.title, "text": d.text} for d in docs], ensure_ascii=False)
        return [{"role": "system", "content": QA_SYSTEM}, {"role": "user", "content": q.question},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": results}]
    headed = "\n\n".join(f"## {d.title}\n{d.text}" for d in docs)
    return [{"role": "system", "content": QA_SYSTEM},
            {"role": "user", "content": f"Here are the documents for my questions.\n\n{headed}"},
            {"role": "assistant", "content": "Thank you, I have read them."},
            {"role": "user", "content": q.question}]


# -- processes ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(proc: subprocess.Popen[bytes], url: str, what: str) -> None:
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            httpx.get(f"{url}/health", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


def spawn(args: list[str], what: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*args, "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, what)
    return proc, url


def terse_serve(*flags: str) -> list[str]:
    return [sys.executable, "-m", "terse.pipelines.cli", "serve", "--log-level", "warning", *flags]


def run_role(role: str, port: int, kv_blocks: int, stub_delay_ms: float = 0.0) -> None:
    """Child processes: the engine server over the reference model, or the instant stub upstream."""
    import uvicorn

    if role == "engine":
        import torch

        from terse.backend import load_backend
        from terse.models import reference_model_path
        from terse.pipelines.server import ServerConfig, engine_app

        torch.set_num_threads(2)
        backend = load_backend(f"local:{reference_model_path()}", num_kv_blocks=kv_blocks, max_model_len=4096)
        app = engine_app(backend, ServerConfig(served_model_names=(MODEL,)))
    else:
        app = stub_app(stub_delay_ms / 1000)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def stub_app(delay_s: float = 0.0) -> Any:
    """An OpenAI-compatible chat endpoint (harness only): a fixed answer with usage, at once or after
    `delay_s` (a model's time to answer, without using the CPU)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    answer = {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": MODEL,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "stub"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    async def chat(request: Request) -> JSONResponse:
        await request.body()
        if delay_s:
            await asyncio.sleep(delay_s)
        return JSONResponse(answer)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])


class Recorder:
    """Between the proxies and the engine: keeps every forwarded body by request id, then forwards it."""

    def __init__(self, upstream: str) -> None:
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.upstream = upstream
        self.bodies: dict[str, Any] = {}
        self._client: httpx.AsyncClient | None = None
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Any) -> Any:
        from starlette.responses import Response

        body = await request.body()
        self.bodies[request.headers.get("x-request-id", "")] = json.loads(body)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=900)
        answer = await self._client.post(f"{self.upstream}/v1/chat/completions", content=body,
                                         headers={"content-type": "application/json"})
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))


# -- the accuracy run --------------------------------------------------------------------------------------
def ask(url: str, request_id: str, messages: Messages, max_tokens: int) -> dict[str, Any]:
    answer = httpx.post(f"{url}/v1/chat/completions", timeout=900, headers={"x-request-id": request_id},
                        json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    answer.raise_for_status()
    body = answer.json()
    return {"text": body["choices"][0]["message"]["content"] or "",
            "upstream_prompt_tokens": body["usage"]["prompt_tokens"],
            "original": int(answer.headers["x-terse-original-prompt-tokens"]),
            "sent": int(answer.headers["x-terse-sent-prompt-tokens"]),
            "terse": body["usage"].get("terse", {})}


def kept(q: Question, forwarded: Messages) -> bool:
    text = json.dumps([m.get("content") for m in forwarded], ensure_ascii=False)
    return all(item in text for item in (q.items or (q.answer,)))


def accuracy(args: argparse.Namespace, questions: list[Question], data: SplitData) -> list[dict[str, Any]]:
    from terse.models import reference_model_path
    from terse.pipelines.server import ServerThread

    engine, engine_url = spawn([sys.executable, __file__, "--role", "engine", "--kv-blocks", str(args.kv_blocks)], "engine")
    recorder = Recorder(engine_url)
    relay = ServerThread(recorder.app).start()
    proxies: dict[float, tuple[subprocess.Popen[bytes], str]] = {}
    tokenizer = str(reference_model_path())
    try:
        for ratio in [1.0, *args.ratios]:
            flags = ["--upstream", f"{relay.url}/v1", "--tokenizer", tokenizer]
            if ratio > 1:
                flags += ["--compress", "--compress-rate", repr(1 / ratio)]
            proxies[ratio] = spawn(terse_serve(*flags), f"proxy {ratio:g}x")
        jobs = [(ratio, layout, q) for ratio in proxies for layout in LAYOUTS for q in questions]
        t0 = time.perf_counter()

        def run(job: tuple[float, str, Question]) -> dict[str, Any]:
            ratio, layout, q = job
            rid = f"{ratio:g}-{layout}-{q.qid}"
            got = ask(proxies[ratio][1], rid, layout_messages(layout, q, data), args.max_tokens)
            forwarded = recorder.bodies.pop(rid)["messages"]
            terse_usage = got.pop("terse")
            return {"ratio": ratio, "layout": layout, "qid": q.qid, "kind": q.kind, **got,
                    "usage_matches_headers": terse_usage.get("saved_prompt_tokens", 0) == got["original"] - got["sent"],
                    "unrecognised": terse_usage.get("unrecognised_messages", "none"),
                    "kept": kept(q, forwarded), "em": exact_match(got["text"], q.answer, q.items)}

        with ThreadPoolExecutor(args.concurrency) as pool:
            rows = []
            for n, row in enumerate(pool.map(run, jobs), start=1):
                rows.append(row)
                if n % 100 == 0:
                    print(f"[chat-layouts] {n}/{len(jobs)} requests, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return rows
    finally:
        for proc, _ in proxies.values():
            proc.terminate()
        relay.stop()
        engine.terminate()
        for proc in [engine, *(p for p, _ in proxies.values())]:
            proc.wait(30)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    base = {(r["layout"], r["qid"]): r["em"] for r in rows if r["ratio"] == 1.0}
    for layout in LAYOUTS:
        for ratio in sorted({r["ratio"] for r in rows}):
            mine = [r for r in rows if r["layout"] == layout and r["ratio"] == ratio]
            em = statistics.mean(r["em"] for r in mine)
            full = statistics.mean(base[(layout, r["qid"])] for r in mine)
            diffs = [int(r["em"]) - int(base[(layout, r["qid"])]) for r in mine]
            out.append({
                "layout": layout, "ratio": ratio, "num_questions": len(mine),
                "forwarded": sum(r["sent"] for r in mine) / sum(r["original"] for r in mine),
                "forwarded_max": max(r["sent"] / r["original"] for r in mine),
                "kept": statistics.mean(r["kept"] for r in mine),
                "exact_match": em, "em_vs_uncompressed": em - full,
                # paired: answers right uncompressed and wrong here (lost), and the reverse (gained)
                "lost": diffs.count(-1), "gained": diffs.count(1), "em_vs_uncompressed_ci95": paired_ci95(diffs),
                "by_kind": {k: statistics.mean(r["em"] for r in mine if r["kind"] == k) for k in KINDS
                            if any(r["kind"] == k for r in mine)},
                "original_tokens": statistics.mean(r["original"] for r in mine),
                "sent_tokens": statistics.mean(r["sent"] for r in mine),
                "upstream_prompt_tokens": statistics.mean(r["upstream_prompt_tokens"] for r in mine),
                "unrecognised": sum(r["unrecognised"] != "none" for r in mine),
                "usage_matches_headers": all(r["usage_matches_headers"] for r in mine),
            })
    return out


def paired_ci95(diffs: list[int]) -> tuple[float, float]:
    """95% interval of the mean paired difference (normal approximation over questions)."""
    if len(diffs) < 2:
        return (float("nan"), float("nan"))
    mean = statistics.mean(diffs)
    half = 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5
    return (mean - half, mean + half)


# -- the overhead run --------------------------------------------------------------------------------------
def overhead(args: argparse.Namespace, questions: list[Question], data: SplitData) -> dict[str, Any]:
    from terse.models import reference_model_path

    stub, stub_url = spawn([sys.executable, __file__, "--role", "stub", "--stub-delay-ms", str(args.stub_delay_ms)],
                           "stub")
    tokenizer = str(reference_model_path())
    plain, plain_url = spawn(terse_serve("--upstream", f"{stub_url}/v1", "--tokenizer", tokenizer), "proxy")
    squeeze, squeeze_url = spawn(terse_serve("--upstream", f"{stub_url}/v1", "--tokenizer", tokenizer, "--compress",
                                             "--compress-rate", "0.25"), "compressing proxy")
    targets = {"direct": stub_url, "proxy": plain_url, "proxy+compress": squeeze_url}
    requests = [layout_messages(layout, q, data) for q in questions[: args.overhead_questions] for layout in LAYOUTS]
    times: dict[str, list[float]] = {name: [] for name in targets}
    try:
        with httpx.Client(timeout=60) as client:
            def once(url: str, messages: Messages) -> float:
                t = time.perf_counter()
                client.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages}).raise_for_status()
                return time.perf_counter() - t

            for messages in requests[:8]:  # warm-up: connections, imports, first compressions
                for url in targets.values():
                    once(url, messages)
            for _ in range(args.overhead_rounds):
                for messages in requests:
                    for name, url in targets.items():  # alternating: the same noise reaches every target
                        times[name].append(once(url, messages))
        tokens = [ask_tokens(squeeze_url, m) for m in requests[:8]]
    finally:
        for proc in (squeeze, plain, stub):
            proc.terminate()
            proc.wait(30)
    p50 = {name: statistics.median(v) * 1000 for name, v in times.items()}
    p90 = {name: statistics.quantiles(v, n=10)[-1] * 1000 for name, v in times.items()}
    return {"num_requests": len(times["direct"]), "mean_original_tokens": statistics.mean(tokens),
            "p50_ms": p50, "p90_ms": p90,
            "added_p50_ms": {name: p50[name] - p50["direct"] for name in ("proxy", "proxy+compress")},
            "added_p90_ms": {name: p90[name] - p90["direct"] for name in ("proxy", "proxy+compress")},
            "compress_vs_proxy_p50_ms": p50["proxy+compress"] - p50["proxy"],
            "hook_ms": hook_times(requests)}


def ask_tokens(url: str, messages: Messages) -> int:
    answer = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages}, timeout=60)
    return int(answer.headers["x-terse-original-prompt-tokens"])


def compress_hook(rate: float = 0.25) -> Any:
    """The hook `terse serve --compress --compress-rate R --tokenizer <reference>` builds."""
    from terse.models import reference_model_path
    from terse.pipelines.server.hooks import build_hook

    return build_hook("compress", {"rate": rate, "tokenizer": str(reference_model_path())})


def hook_times(requests: list[Messages]) -> dict[str, float]:
    """In-process medians over 3 passes: the compress hook alone on requests seen before (every text
    cached, as the overhead run's repeated requests are), on unseen ones (caches cleared before each
    request), and tokenizing the rendered prompt once (the floor for anything that counts tokens)."""
    from terse.backend.openai_tokens import LocalTokenizer
    from terse.models import reference_model_path
    from terse.pipelines.server import ServerConfig
    from terse.pipelines.server.schema import parse_chat

    tokenizer = LocalTokenizer(str(reference_model_path()))
    hook = compress_hook()
    parsed = [parse_chat({"model": MODEL, "messages": m}, ServerConfig()) for m in requests]

    def median_ms(fn: Callable[[Any], object], before: Callable[[], object] = lambda: None) -> float:
        samples = []
        for _ in range(3):
            for p in parsed:
                before()
                t = time.perf_counter()
                fn(p)
                samples.append(time.perf_counter() - t)
        return statistics.median(samples) * 1000

    for p in parsed:  # seen once
        hook.on_request(p)
    seen = median_ms(hook.on_request)
    return {"compress_hook": seen, "compress_hook_unseen": median_ms(hook.on_request, hook.compressor.clear_caches),
            "tokenize_once": median_ms(lambda p: tokenizer.count_tokens(tokenizer.render_chat(p.messages) or ""))}


def lone_spans(questions: list[Question], data: SplitData, ratios: list[float]) -> list[dict[str, Any]]:
    """In process, the proxy's compress hook on every request: of the fragments it keeps (runs of
    neighbouring kept words, `CompressionResult.spans`), how many are nothing but protected spans
    (`ProtectionPolicy.standard()`: a number, date, URL, ... kept without its sentence), and their
    share of the kept characters."""
    from terse.compress import ProtectionPolicy, compress_messages
    from terse.compress.protect import structural_spans
    from terse.compress.words import split_words

    policy = ProtectionPolicy.standard()
    out = []
    for ratio in ratios:
        hook = compress_hook(1 / ratio)
        compress = hook.compressor.compress
        contexts: list[str] = []

        def spy(texts: Any, *, seen: list[str] = contexts, inner: Any = compress, **kwargs: Any) -> Any:
            seen[:] = list(texts)  # the documents, in the result's context order
            return inner(texts, **kwargs)

        hook.compressor.compress = spy
        for layout in LAYOUTS:
            num_fragments = num_lone = kept_chars = lone_chars = 0
            for q in questions:
                result = compress_messages(hook.compressor, layout_messages(layout, q, data), hook.policy,
                                           layouts=hook.layouts).result
                for span in result.spans if result is not None else ():
                    text = contexts[span.context_index]
                    found = structural_spans(text, policy)
                    words = [(span.start + a, span.start + b) for a, b in split_words(text[span.start : span.end])]
                    lone = bool(words) and all(any(a < w1 and w0 < b for a, b in found) for w0, w1 in words)
                    num_fragments += 1
                    kept_chars += span.end - span.start
                    num_lone += lone
                    lone_chars += (span.end - span.start) if lone else 0
            out.append({"layout": layout, "ratio": ratio, "fragments": num_fragments, "lone_protected": num_lone,
                        "lone_share": num_lone / max(1, num_fragments), "lone_char_share": lone_chars / max(1, kept_chars)})
            print(f"[spans] {ratio:g}x {layout}: {num_lone}/{num_fragments} kept fragments are lone protected spans "
                  f"({num_lone / max(1, num_fragments):.1%}), {lone_chars / max(1, kept_chars):.2%} of kept characters",
                  file=sys.stderr)
    return out


def profile(requests: list[Messages], passes: int, unseen: bool) -> None:
    """cProfile of the compress hook on the requests (`unseen`: caches cleared before each request);
    prints the functions taking the most time, cumulative and own."""
    import cProfile
    import pstats

    from terse.pipelines.server import ServerConfig
    from terse.pipelines.server.schema import parse_chat

    hook = compress_hook()
    parsed = [parse_chat({"model": MODEL, "messages": m}, ServerConfig()) for m in requests]
    for p in parsed:
        hook.on_request(p)
    profiler = cProfile.Profile()
    for _ in range(passes):
        for p in parsed:
            if unseen:
                hook.compressor.clear_caches()
            profiler.enable()
            hook.on_request(p)
            profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


def dump(report: dict[str, Any]) -> str:
    """The report as JSON, one line per request row (the rows are most of it)."""
    rows = report["rows"]
    head = json.dumps({**report, "rows": "ROWS"}, indent=1)
    lines = ",\n  ".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in rows)
    return head.replace('"ROWS"', f"[\n  {lines}\n ]" if rows else "[]")


def subsample(questions: list[Question], per_world: int) -> list[Question]:
    """The first `per_world` questions of each world, kinds taken in turn (single, multi, list, ...)."""
    out = []
    for world in dict.fromkeys(q.qid.split("-")[0] for q in questions):
        by_kind = [[q for q in questions if q.qid.split("-")[0] == world and q.kind == k] for k in KINDS]
        turns = [q for group in zip(*by_kind) for q in group]
        out += (turns + [q for g in by_kind for q in g if q not in turns])[:per_world]
    return out


# -- main --------------------------------------------------------------------------------------------------
def table(summary: list[dict[str, Any]], over: dict[str, Any] | None) -> Iterator[str]:
    yield (f"{'layout':<9}{'ratio':>6}{'n':>5}{'forwarded (max)':>17}{'kept':>7}{'EM':>7}{'vs full':>9}{'lost/gained':>13}"
           f"{'95% CI':>17}{'tokens':>14}")
    for r in summary:
        tokens = f"{r['sent_tokens']:.0f}/{r['original_tokens']:.0f}"
        lost_gained = f"{r['lost']}/{r['gained']}"
        ci = "[{:+.3f}, {:+.3f}]".format(*r["em_vs_uncompressed_ci95"])
        forwarded = f"{r['forwarded']:.3f} ({r['forwarded_max']:.3f})"
        yield (f"{r['layout']:<9}{r['ratio']:>5g}x{r['num_questions']:>5}{forwarded:>17}{r['kept']:>7.2f}"
               f"{r['exact_match']:>7.3f}{r['em_vs_uncompressed']:>+9.3f}{lost_gained:>13}{ci:>17}{tokens:>14}")
    if over:
        added = over["added_p50_ms"]
        hook = over["hook_ms"]
        yield (f"overhead p50 at {over['mean_original_tokens']:.0f} tokens: proxy +{added['proxy']:.1f} ms, "
               f"proxy+compress +{added['proxy+compress']:.1f} ms (+{over['compress_vs_proxy_p50_ms']:.1f} ms over the "
               f"proxy alone); hook alone {hook['compress_hook']:.1f} ms on seen requests, "
               f"{hook['compress_hook_unseen']:.1f} ms on unseen ones; tokenize once {hook['tokenize_once']:.1f} ms")


def saved_table(path: Path, worlds: range) -> Iterator[str]:
    """The table of a saved accuracy run (`--out`), for the questions of `worlds` only, with the paired
    difference pooled over layouts per ratio."""
    from terse.synth.dataset import _SEED_BASE

    rows = [r for r in json.loads(path.read_text())["rows"]
            if int(r["qid"].split("-")[0][2:]) - _SEED_BASE["test"] in worlds]
    if not rows:
        raise SystemExit(f"{path} has no rows of worlds {worlds.start}-{worlds.stop - 1}")
    yield f"worlds {worlds.start}-{worlds.stop - 1}: {len(rows)} requests"
    yield from table(summarize(rows), None)
    base = {(r["layout"], r["qid"]): r["em"] for r in rows if r["ratio"] == 1.0}
    for ratio in sorted({r["ratio"] for r in rows} - {1.0}):
        diffs = [int(r["em"]) - int(base[(r["layout"], r["qid"])]) for r in rows if r["ratio"] == ratio]
        yield ("pooled over layouts at {:g}x: n {}, vs full {:+.3f}, lost/gained {}/{}, 95% CI [{:+.3f}, {:+.3f}]".format(
            ratio, len(diffs), statistics.mean(diffs), diffs.count(-1), diffs.count(1), *paired_ci95(diffs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, default=4, help="test-split worlds")
    parser.add_argument("--first-world", type=int, default=2, help="first world (0-1 are the compression bench's)")
    parser.add_argument("--per-world", type=int, default=10, help="questions per world, kinds interleaved (0: all ~29)")
    parser.add_argument("--ratios", default="2,4,8")
    parser.add_argument("--context-tokens", type=int, default=2560, help="full context size (~3K-token requests)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--kv-blocks", type=int, default=2400, help="engine KV pool (16-token blocks)")
    parser.add_argument("--overhead-questions", type=int, default=6, help="questions x 4 layouts per overhead round")
    parser.add_argument("--overhead-rounds", type=int, default=5)
    parser.add_argument("--part", choices=["all", "accuracy", "overhead", "profile", "spans", "table"], default="all",
                        help="profile: cProfile of the compress hook in this process on the overhead requests; "
                             "spans: kept fragments that are lone protected spans (in process, no model); "
                             "table: the table of the accuracy run saved in --out, for --first-world/--worlds only")
    parser.add_argument("--unseen", action="store_true", help="profile: clear the caches before each request")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chat_layouts.json")
    parser.add_argument("--stub-delay-ms", type=float, default=0.0,
                        help="overhead: the stub upstream answers after this long (a model's time, no CPU)")
    parser.add_argument("--role", choices=["engine", "stub"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        run_role(args.role, args.port, args.kv_blocks, args.stub_delay_ms)
        return
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if args.part == "table":
        print("\n".join(saved_table(args.out, range(args.first_world, args.first_world + args.worlds))))
        return
    data = build_split("test", SplitConfig(num_worlds=args.worlds, needle_lengths=(), context_tokens=args.context_tokens),
                       first_world=args.first_world)
    questions = [q for q in data.questions if q.kind in KINDS]
    if args.per_world:
        questions = subsample(questions, args.per_world)
    if args.part == "spans":
        report = {"command": "python bench/chat_layouts.py " + " ".join(sys.argv[1:]),
                  "worlds": list(range(args.first_world, args.first_world + args.worlds)),
                  "num_questions": len(questions), "lone_spans": lone_spans(questions, data, args.ratios)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        return
    if args.part == "profile":
        requests = [layout_messages(layout, q, data) for q in questions[: args.overhead_questions] for layout in LAYOUTS]
        profile(requests, args.overhead_rounds, args.unseen)
        return
    t0 = time.perf_counter()
    rows = accuracy(args, questions, data) if args.part in ("all", "accuracy") else []
    seconds = time.perf_counter() - t0
    summary = summarize(rows) if rows else []
    over = overhead(args, questions, data) if args.part in ("all", "overhead") else None

    import torch
    import transformers

    report = {
        "command": "python bench/chat_layouts.py " + " ".join(sys.argv[1:]),
        "worlds": list(range(args.first_world, args.first_world + args.worlds)),
        "num_questions": len(questions), "context_tokens": args.context_tokens,
        "hardware": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "accuracy_seconds": seconds, "summary": summary, "overhead": over, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(dump(report))
    tmp.replace(args.out)
    print("\n".join(table(summary, over)))


if __name__ == "__main__":
    main()
