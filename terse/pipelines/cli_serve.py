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
    parser.add_argument("--tokenizer", help="proxy mode: tokenizer for exact prompt accounting (else ~4 chars/token)")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--max-messages", type=int, default=1024)
    parser.add_argument("--max-tokens-limit", type=int, default=32768, help="largest max_tokens a request may ask")
    parser.add_argument("--compress", action="store_true", help="compress chat prompts (terse.compress)")
    parser.add_argument("--compress-rate", type=float, default=0.5, help="target fraction of tokens kept")
    parser.add_argument("--compress-scorer", help="backend spec of the scoring model (default: the served model "
                        "in engine mode; required in proxy mode)")
    parser.add_argument("--retrieve-index", help="add passages from this terse.retrieval index to chat prompts")
    parser.add_argument("--retrieve-top-k", type=int, default=4)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # INT4 weight-only quantization of local: models (terse.backend.local.quant)
    from terse.backend.local.quant.cli import add_quantization_arguments

    parser.add_argument("--quantization", choices=["int4"], help="engine mode, local: models: quantize the "
                        "weights to INT4 as they load (see the --quantization-* flags)")
    add_quantization_arguments(parser)


def _hooks(args: argparse.Namespace, backend: Any) -> list[Any]:
    from terse.pipelines.server.hooks import build_hook

    hooks = []
    if args.retrieve_index:
        hooks.append(build_hook("retrieve", {"index": args.retrieve_index, "top_k": args.retrieve_top_k}))
    if args.compress:
        scorer = args.compress_scorer or backend
        if scorer is None:
            raise ConfigError("--compress in proxy mode needs --compress-scorer <backend spec> (a local model)")
        hooks.append(build_hook("compress", {"scorer": scorer, "rate": args.compress_rate}))
    return hooks


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
        from terse.backend.local.quant.cli import serve_options

        backend = load_backend(spec, **serve_options(args, spec))
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
