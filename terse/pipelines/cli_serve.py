"""`terse serve`: an OpenAI-compatible server in front of a local model (engine mode) or an upstream API
(proxy mode), with optional compression / retrieval hooks.

    terse serve --model local:path/to/model                     # engine mode
    terse serve --upstream https://api.openai.com/v1 --compress  # proxy mode

Keys come from flags or the environment: TERSE_API_KEY (clients must send it), TERSE_UPSTREAM_API_KEY
(sent upstream). FastAPI and uvicorn (the `server` extra) are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from terse.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--model", help="engine mode: a backend spec (local:<path>, hf:<path>, openai:<url>#<model>) "
                      "or a model directory (served with local:)")
    mode.add_argument("--upstream", help="proxy mode: upstream API root, e.g. http://127.0.0.1:8001/v1")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("TERSE_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on every request (env TERSE_API_KEY)")
    parser.add_argument("--served-model-name", action="append", default=[],
                        help="engine mode: model id clients send (repeatable; default: the backend's name)")
    parser.add_argument("--upstream-api-key", default=os.environ.get("TERSE_UPSTREAM_API_KEY"),
                        help="proxy mode: key sent upstream (env TERSE_UPSTREAM_API_KEY)")
    parser.add_argument("--upstream-timeout", type=float, default=600.0, help="proxy mode: read timeout, seconds")
    parser.add_argument("--tokenizer", help="proxy mode: the upstream model's tokenizer (path or hub name), for exact "
                        "prompt accounting and compression budgets (else ~4 chars/token, reported as an estimate)")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--max-messages", type=int, default=1024)
    parser.add_argument("--max-tokens-limit", type=int, default=32768, help="largest max_tokens a request may ask")
    _add_compress_arguments(parser)
    parser.add_argument("--retrieve-index", help="add passages from this terse.retrieval index to chat prompts")
    parser.add_argument("--retrieve-top-k", type=int, default=4)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _hooks(args: argparse.Namespace, backend: Any) -> list[Any]:
    from terse.pipelines.server.hooks import build_hook

    hooks = []
    if args.retrieve_index:
        hooks.append(build_hook("retrieve", {"index": args.retrieve_index, "top_k": args.retrieve_top_k}))
    if args.compress:
        hooks.append(build_hook("compress", _compress_options(args, backend)))
    return hooks


def _add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compress", action="store_true", help="compress the documents in chat prompts, wherever "
                        "they sit (terse.compress); scorer-free unless --compress-scorer is given")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--compress-rate", type=float, help="fraction of the documents' tokens kept (default 0.5)")
    budget.add_argument("--compress-target", type=int, help="most content tokens a compressed conversation keeps")
    parser.add_argument("--compress-scorer", help="backend spec of a scoring model adding the model-based stages "
                        "(LM token pruning); default: none (BM25 ranking, sentence filter, exact fit)")
    parser.add_argument("--compress-protect", default="default", help="spans never cut: 'default' (numbers, code, "
                        "...), 'none', or comma-separated ProtectionPolicy flags such as numbers,code_blocks")


def _compress_options(args: argparse.Namespace, backend: Any) -> dict[str, Any]:
    """Compress hook options: budgets count in --tokenizer, else the served model's (engine mode), else
    they are estimated and the accounting says so."""
    options: dict[str, Any] = {"protect": args.compress_protect, "tokenizer": args.tokenizer or backend}
    if args.compress_target is not None:
        options["target"] = args.compress_target
    else:
        options["rate"] = 0.5 if args.compress_rate is None else args.compress_rate
    if args.compress_scorer:
        options["scorer"] = args.compress_scorer
    return options


def _is_spec(value: str) -> bool:
    from terse.backend.registry import parse_spec

    try:
        parse_spec(value)
    except ConfigError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    from terse.backend.registry import load_backend
    from terse.pipelines.server.build import engine_app, proxy_app
    from terse.pipelines.server.config import ProxyConfig, ServerConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages,
        max_tokens_limit=args.max_tokens_limit,
        served_model_names=tuple(args.served_model_name),
    )
    if args.model:
        spec = args.model if _is_spec(args.model) else f"local:{args.model}"
        backend = load_backend(spec)
        app = engine_app(backend, config, _hooks(args, backend))
    else:
        proxy = ProxyConfig(
            upstream_url=args.upstream,
            upstream_api_key=args.upstream_api_key or None,
            timeout_s=args.upstream_timeout,
            tokenizer=args.tokenizer,
        )
        app = proxy_app(proxy, config, _hooks(args, None))
    import uvicorn

    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level)
    return 0
