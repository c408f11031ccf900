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
import socket
import sys
from pathlib import Path
from typing import Any

from terse.errors import ConfigError, TerseError
from terse.pipelines.cli_quantize import add_quantization_arguments, quantization_options


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
    parser.add_argument("--embedding-model", default=None, metavar="MODEL",
                        help="engine mode: sentence-transformers name or path served at /v1/embeddings "
                        "(default: the bundled all-MiniLM-L6-v2, loaded on first use; 'none' to serve no embeddings)")
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--max-messages", type=int, default=1024)
    parser.add_argument("--max-tokens-limit", type=int, default=32768, help="largest max_tokens a request may ask")
    _add_compress_arguments(parser)
    parser.add_argument("--retrieve-index", help="add passages from this terse.retrieval index to chat prompts")
    parser.add_argument("--retrieve-top-k", type=int, default=4)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_engine_arguments(parser)


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Local-engine options (engine mode with a local: model)."""
    group = parser.add_argument_group("local engine (--model local:...)")
    group.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                       help="most memory for the KV cache: a fraction of free memory (0.3) or a size (8GiB, "
                       "512MiB); default: what the running sequences can need, capped at 0.85 of free GPU "
                       "memory or 0.5 of available RAM")
    group.add_argument("--sparse-prefill", action="store_true",
                       help="prefill long uncached prompt chunks with the sparse attention kernels")
    group.add_argument("--sparse-patterns", default=None, metavar="FILE",
                       help="per-head patterns from `terse sparse-patterns` (default: the model directory's "
                       "sparse_patterns.json, else built-in defaults); implies --sparse-prefill")
    group.add_argument("--speculative", default=None, metavar="METHOD",
                       help="speculative decoding: 'prompt_lookup' drafts from the prompt and earlier output "
                       "(copied spans come out several tokens per step; greedy output unchanged)")
    group.add_argument("--speculative-tokens", type=int, default=None, metavar="K",
                       help="most draft tokens verified per step and sequence (default 4)")
    group.add_argument("--speculative-ngram", default=None, metavar="MIN:MAX",
                       help="suffix lengths matched, longest first (default 1:3)")
    group.add_argument("--speculative-max-batch", default=None, metavar="N",
                       help="no drafting in steps where more than N sequences decode; 'none' for no limit "
                       "(default 8)")
    group.add_argument("--quantization", choices=["int4"], help="quantize the weights to INT4 as they load "
                       "(see the --quantization-* flags)")
    add_quantization_arguments(group)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields from the local-engine flags, validated before anything loads; an error when
    they are given for another backend or in proxy mode."""
    options: dict[str, Any] = {}
    if args.kv_cache_memory is not None:
        options["kv_cache_memory"] = args.kv_cache_memory
    if args.sparse_prefill or args.sparse_patterns:
        options["sparse_prefill"] = {"enabled": True, "patterns_path": args.sparse_patterns}
    speculative = _speculative_options(args)
    if speculative is not None:
        options["speculative"] = speculative
    options.update(quantization_options(args))  # INT4 weight-only quantization (cli_quantize.py)
    if not options:
        return options
    spec = (args.model if _is_spec(args.model) else f"local:{args.model}") if args.model else None
    if spec is None or not spec.startswith("local:"):
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in options)
        raise ConfigError(f"{flags} configure the local engine; serve a model with --model local:<dir>")
    from terse.backend.local.config import EngineConfig

    EngineConfig.from_options(options)  # a bad size or a missing patterns file fails here (_flag_names)
    return options


def _speculative_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `speculative` table from --speculative and its options (None when speculation is off)."""
    if args.speculative is None:
        if any(v is not None for v in (args.speculative_tokens, args.speculative_ngram, args.speculative_max_batch)):
            raise ConfigError("--speculative-tokens / --speculative-ngram / --speculative-max-batch need "
                              "--speculative prompt_lookup")
        return None
    table: dict[str, Any] = {"method": args.speculative}
    if args.speculative_tokens is not None:
        table["num_draft_tokens"] = args.speculative_tokens
    if args.speculative_ngram is not None:
        low, sep, high = args.speculative_ngram.partition(":")
        if not (sep and low.isdigit() and high.isdigit()):
            raise ConfigError(f"--speculative-ngram {args.speculative_ngram!r} must be MIN:MAX, e.g. 1:3")
        table["min_ngram"], table["max_ngram"] = int(low), int(high)
    if args.speculative_max_batch is not None:
        value = args.speculative_max_batch.strip().lower()
        if value != "none" and not value.isdigit():
            raise ConfigError(f"--speculative-max-batch {args.speculative_max_batch!r} must be a number of "
                              "sequences (e.g. 32) or 'none'")
        table["max_batch_size"] = None if value == "none" else int(value)
    return table


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
    """Serve until interrupted. A configuration error is one line on stderr naming the value and the fix
    (exit status 2), found before any model loads where it can be."""
    try:
        app, config = _build(args)
    except TerseError as e:
        print(f"terse serve: error: {_flag_names(' '.join(str(e).split()))}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level)
    return 0


def _build(args: argparse.Namespace) -> tuple[Any, Any]:
    from terse.backend.registry import load_backend
    from terse.pipelines.server.build import engine_app, proxy_app
    from terse.pipelines.server.config import ProxyConfig, ServerConfig

    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages,
        max_tokens_limit=args.max_tokens_limit,
        served_model_names=tuple(args.served_model_name),
    )
    _check_flags(args)
    engine_options = _engine_options(args)
    _check_bindable(config.host, config.port)
    proxy = None
    if args.upstream:
        proxy = ProxyConfig(
            upstream_url=args.upstream,
            upstream_api_key=args.upstream_api_key or None,
            timeout_s=args.upstream_timeout,
            tokenizer=args.tokenizer,
        )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if proxy is not None:
        return proxy_app(proxy, config, _hooks(args, None)), config
    spec = args.model if _is_spec(args.model) else f"local:{args.model}"
    embedding = _embedding_model(args.embedding_model)
    backend = load_backend(spec, **engine_options)
    return engine_app(backend, config, _hooks(args, backend), embedding_model=embedding), config


def _check_flags(args: argparse.Namespace) -> None:
    """Values only a flag can get wrong, checked before anything loads."""
    if args.compress_rate is not None and not 0 < args.compress_rate <= 1:
        raise ConfigError(f"--compress-rate {args.compress_rate} must be in (0, 1], e.g. 0.5 keeps half the tokens")
    if args.compress_target is not None and args.compress_target < 1:
        raise ConfigError(f"--compress-target {args.compress_target} must be >= 1 tokens, e.g. 2000")
    if (args.compress_rate is not None or args.compress_target is not None or args.compress_scorer) and not args.compress:
        raise ConfigError("--compress-rate / --compress-target / --compress-scorer need --compress")
    if args.retrieve_top_k < 1:
        raise ConfigError(f"--retrieve-top-k {args.retrieve_top_k} must be >= 1, e.g. 4")
    if args.upstream_timeout <= 0:
        raise ConfigError(f"--upstream-timeout {args.upstream_timeout} must be > 0 seconds, e.g. 600")
    if args.retrieve_index and not Path(args.retrieve_index).is_dir():
        raise ConfigError(f"--retrieve-index {args.retrieve_index!r} is not a directory; build one with "
                          f"'terse index DOCS -o DIR'")
    if args.model and not _is_spec(args.model) and not Path(args.model).is_dir():
        raise ConfigError(f"--model {args.model!r} is neither a backend spec (local:, hf:, openai:) nor a model "
                          f"directory; give a folder holding config.json and *.safetensors")
    if args.upstream and args.embedding_model:
        raise ConfigError("--embedding-model is for engine mode; proxy mode forwards /v1/embeddings upstream")


def _check_bindable(host: str, port: int) -> None:
    """Fail now, not after the model loaded, when host:port cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} does not resolve ({e.strerror}); use 127.0.0.1 or 0.0.0.0") from e
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(
                f"--port {port} on {host}: cannot listen there ({e.strerror}); pick a free port, e.g. --port 8001"
            ) from e


def _embedding_model(value: str | None) -> str | None:
    """The model for /v1/embeddings: the bundled one by default, None for 'none'; an explicit one loads now."""
    from terse.pipelines.server.embeddings import EmbeddingService
    from terse.retrieval.config import DEFAULT_EMBEDDER

    if value is None:
        return DEFAULT_EMBEDDER
    if value.lower() == "none":
        return None
    try:
        EmbeddingService(value).load()
    except TerseError as e:
        raise ConfigError(f"--embedding-model {value!r}: {e}") from e
    return value


_CONFIG_FLAGS = {
    "port": "--port", "max_body_bytes": "--max-body-bytes", "max_messages": "--max-messages",
    "max_tokens_limit": "--max-tokens-limit", "upstream_url": "--upstream", "api_key": "--api-key",
    "kv_cache_memory": "--kv-cache-memory", "sparse_prefill.patterns_path": "--sparse-patterns",
    "speculative.method": "--speculative", "speculative.num_draft_tokens": "--speculative-tokens",
    "speculative.min_ngram": "--speculative-ngram", "speculative.max_ngram": "--speculative-ngram",
    "speculative.max_batch_size": "--speculative-max-batch",
}


def _flag_names(message: str) -> str:
    """ServerConfig / ProxyConfig / EngineConfig errors name fields ("port=99999 ..."): name the flag instead."""
    for field, flag in _CONFIG_FLAGS.items():
        if message.startswith(f"{field}="):
            return f"{flag} {message[len(field) + 1:]}"
    return message
