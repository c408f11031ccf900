"""`LocalEngine`: terse's own inference engine behind the `Backend` contract.

One loop thread owns the scheduler, the KV pool and the model; other threads talk to it through a
queue of commands (add a request, cancel one). Each loop iteration drains the queue, asks the scheduler
for a plan, runs it, and turns sampled tokens into text deltas, stops and completions. A request that
fails (bad tokens, a detokenizer error, a failed step) fails its own handle; the loop keeps going.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from terse.backend.base import BackendBase
from terse.backend.grammar import GrammarViolationError
from terse.backend.handle import RequestHandle
from terse.backend.local.attention import PREFILL_PATHS, paged_decode_supported
from terse.backend.local.build import num_kv_blocks, resolve_device, resolve_dtype, resolve_max_model_len
from terse.backend.local.config import EngineConfig
from terse.backend.local.grammar import grammar_compiler, grammar_state
from terse.backend.local.kv_cache import BlockAllocator, KVCachePool
from terse.backend.local.kv_policy import policy_for
from terse.backend.local.models.llama import LlamaForCausalLM, ModelConfig
from terse.backend.local.models.loader import load_model, random_model, read_model_config, resolve_model_dir
from terse.backend.local.prefix_cache import RadixPrefixCache
from terse.backend.local.quant.transform import apply_quantization
from terse.backend.local.requests import Request, validate_prompt
from terse.backend.local.runner import ModelRunner
from terse.backend.local.scheduler import Scheduler
from terse.backend.local.sequence import Sequence as Seq
from terse.backend.local.sparse_prefill import build_sparse_prefill
from terse.backend.sampling import make_generator
from terse.backend.textstream import TextStream
from terse.backend.tokenization import (
    context_ids,
    encode_plain,
    encode_prompt,
    eos_token_ids,
    load_tokenizer,
    render_chat_template,
)
from terse.backend.types import Message, SamplingParams, TokenScores
from terse.errors import BackendUnavailableError, ConfigError, InvalidRequestError, UnsupportedOperationError

_SCORE_PARAMS = SamplingParams(max_tokens=0)


@dataclass
class EngineParts:
    """What the engine wires together (built by `LocalEngine.build`)."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase | None
    model_name: str


class LocalEngine(BackendBase):
    """Continuous-batching engine over a paged, prefix-shared KV cache. Thread-safe."""

    def __init__(self, parts: EngineParts, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        _check_seams(self.config)
        self._model_name = parts.model_name
        self.tokenizer = parts.tokenizer
        self._tok_lock = threading.Lock()  # Rust tokenizers may refuse concurrent use
        model_config = parts.model.config
        self.model_config = model_config
        self.device = next(parts.model.parameters()).device
        self.dtype = next(parts.model.parameters()).dtype
        self._max_model_len = resolve_max_model_len(self.config, model_config)
        parts.model.setup_rope(self._max_model_len, self.device)
        self.num_kv_blocks = num_kv_blocks(self.config, model_config, self._max_model_len, self.dtype, self.device)
        self.pool = KVCachePool(
            num_layers=model_config.num_layers,
            num_blocks=self.num_kv_blocks,
            block_size=self.config.kv_block_size,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.allocator = BlockAllocator(self.num_kv_blocks)
        cache = RadixPrefixCache(self.allocator, self.config.kv_block_size) if self.config.enable_prefix_cache else None
        self.prefix_cache = cache
        self.scheduler = Scheduler(
            allocator=self.allocator,
            block_size=self.config.kv_block_size,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            prefix_cache=cache,
        )
        self.runner = ModelRunner(
            parts.model,
            self.pool,
            device=self.device,
            max_model_len=self._max_model_len,
            prefill_path=self.config.prefill_attention,
            use_triton_decode=self.device.type == "cuda" and paged_decode_supported(self.config.kv_block_size, model_config.head_dim),
            sparse_prefill=build_sparse_prefill(
                self.config.sparse_prefill, parts.model_name, model_config.num_layers, model_config.num_heads
            ),
        )
        if self.device.type == "cuda" and self.config.enable_cuda_graphs:
            self.runner.capture_cuda_graphs(min(self.config.max_cuda_graph_batch_size, self.config.max_num_seqs))
        tok = self.tokenizer
        self.eos_token_ids = eos_token_ids(tok, model_config) if tok is not None else frozenset(model_config.eos_token_ids)
        self._bos_context = context_ids(tok) if tok is not None else []
        self._grammar = grammar_compiler(tok, model_config.vocab_size, sorted(self.eos_token_ids))
        self._requests: dict[int, Request] = {}
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._ids = itertools.count()
        self._closed = False
        self.num_steps = 0
        self.num_prefill_tokens = 0
        self.num_decode_tokens = 0
        self.num_failed_steps = 0
        self._thread = threading.Thread(target=self._loop, name="terse-engine", daemon=True)
        self._thread.start()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, target: str, **config_fields: Any) -> LocalEngine:
        """`local:<dir-or-hub-name>`: load the model and tokenizer; `config_fields` are EngineConfig fields."""
        config = _make_config(config_fields)
        model_dir = resolve_model_dir(target)
        model_config = read_model_config(model_dir)
        device = resolve_device(config)
        model = load_model(model_dir, model_config, device=device, dtype=resolve_dtype(config, device))
        tokenizer = load_tokenizer(model_dir)
        apply_quantization(model, config.quantization, tokenizer=tokenizer)  # INT4 at load time (quant/)
        return cls(EngineParts(model, tokenizer, target), config)

    @classmethod
    def from_random(
        cls, model_config: ModelConfig, config: EngineConfig | None = None, *, seed: int = 0,
        tokenizer: PreTrainedTokenizerBase | None = None, name: str = "random",
    ) -> LocalEngine:
        """An engine over random weights of a given shape, built on the device (speed benchmarks).
        Without a tokenizer it takes token-id prompts only and returns empty texts."""
        config = config or EngineConfig()
        device = resolve_device(config)
        model = random_model(model_config, device=device, dtype=resolve_dtype(config, device), seed=seed)
        apply_quantization(model, config.quantization, tokenizer=tokenizer)
        return cls(EngineParts(model, tokenizer, name), config)

    # -- Backend contract ------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestHandle:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params={params!r} must be a SamplingParams")
        prompt_ids = self._prompt_ids(prompt)
        seq = Seq(next(self._ids), prompt_ids, params, self._max_model_len)
        policy = policy_for(params.streaming_kv or self.config.default_streaming_kv)
        validate_prompt(seq, policy, self._max_model_len, self.num_kv_blocks, self.config.kv_block_size)
        seq.generator = make_generator(params.seed, self.device)
        seq.constraint = grammar_state(self._grammar, params)  # structured output (local/grammar.py)
        handle = RequestHandle(f"local-{seq.seq_id}", on_cancel=lambda: self._send("cancel", seq.seq_id))
        stream = TextStream(self.tokenizer, params.stop, prompt_ids) if self.tokenizer is not None else None
        self._send("add", (Request(seq, policy, handle, stream), None))
        return handle

    def score(self, texts: Sequence[str], *, prefix: str = "") -> list[TokenScores]:
        tok = self._require_tokenizer("score()")
        with self._tok_lock:
            prefix_ids = self._bos_context + encode_plain(tok, prefix)
            encoded = [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
        futures: list[Future[list[float]] | None] = []
        for enc in encoded:
            text_ids = list(enc["input_ids"])
            if not text_ids:
                futures.append(None)
                continue
            ids = prefix_ids + text_ids
            if len(ids) > self._max_model_len:
                raise InvalidRequestError(
                    f"scoring needs {len(ids)} tokens (prefix + text) but max_model_len={self._max_model_len}; "
                    f"shorten the text or raise max_model_len"
                )
            start = max(len(prefix_ids) - 1, 0)
            seq = Seq(next(self._ids), ids, _SCORE_PARAMS, self._max_model_len, num_logprob_start=start)
            future: Future[list[float]] = Future()
            self._send("add", (Request(seq, policy_for(None), None, None), future))
            futures.append(future)
        results = []
        for enc, maybe_future in zip(encoded, futures):
            logprobs = [] if maybe_future is None else maybe_future.result()
            if maybe_future is not None and not prefix_ids:
                logprobs = [float("nan"), *logprobs]  # nothing to condition the first token on
            offsets = tuple((int(a), int(b)) for a, b in enc["offset_mapping"])
            results.append(TokenScores(tuple(enc["input_ids"]), tuple(logprobs), offsets))
        return results

    def render_chat(self, messages: Sequence[Message]) -> str:
        tok = self._require_tokenizer("render_chat()")
        with self._tok_lock:
            text: str = render_chat_template(tok, messages)
        return text

    def encode(self, text: str) -> list[int]:
        tok = self._require_tokenizer("encode()")
        with self._tok_lock:
            return encode_plain(tok, text)

    def decode(self, token_ids: Sequence[int]) -> str:
        tok = self._require_tokenizer("decode()")
        with self._tok_lock:
            decoded = tok.decode(list(token_ids), skip_special_tokens=True)
        return str(decoded)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            return  # a step is still running on the pool; its memory goes when the engine is collected
        # Give the device memory back now, not when the garbage collector next finds this engine's
        # reference cycles: a process that builds engine after engine (benchmarks, tests) would otherwise
        # size each new KV pool from what the dead ones still hold.
        self.runner.release()
        self.pool.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of admitted prompt tokens whose KV came from the prefix cache (0.0 before any request)."""
        admitted = self.scheduler.num_admitted_prompt_tokens
        return self.scheduler.num_cached_tokens / admitted if admitted else 0.0

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: steps, prefill/decode/cached tokens, preemptions, failed steps."""
        return {
            "num_steps": self.num_steps,
            "num_prefill_tokens": self.num_prefill_tokens,
            "num_decode_tokens": self.num_decode_tokens,
            "num_cached_tokens": self.scheduler.num_cached_tokens,
            "num_admitted_prompt_tokens": self.scheduler.num_admitted_prompt_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_failed_steps": self.num_failed_steps,
        }

    # -- helpers on the caller's thread ---------------------------------------------------------
    def _require_tokenizer(self, what: str) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise UnsupportedOperationError(f"{what} needs a tokenizer; this engine was built without one")
        return self.tokenizer

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            tok = self._require_tokenizer("a text prompt")
            if not prompt:
                raise InvalidRequestError("prompt is empty (0 characters); give a non-empty prompt")
            with self._tok_lock:
                return encode_prompt(tok, prompt)
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def _send(self, kind: str, payload: Any) -> None:
        if self._closed:
            raise BackendUnavailableError("the local engine is closed; build a new one")
        self._inbox.put((kind, payload))
        self._wakeup.set()

    # -- the loop thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            self._drain_inbox()
            if not self.scheduler.has_work():
                self._wakeup.wait(timeout=0.1)
                self._wakeup.clear()
                continue
            self._step()
        self._drain_inbox()  # requests submitted while closing are failed too, never left hanging
        for request in list(self._requests.values()):
            self._fail(request, BackendUnavailableError("the local engine was closed before this request ended"))

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request, future = payload
                request.future = future
                self._requests[request.seq.seq_id] = request
                self.scheduler.add(request.seq, request.policy)
            elif kind == "cancel" and payload in self._requests:
                self._finish(self._requests[payload], "abort")

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            time.sleep(0.001)
            return
        try:
            output = self.runner.execute(plan)
        except Exception as e:  # a failed step fails the requests in it, not the engine
            self.num_failed_steps += 1
            for chunk in plan.chunks:
                if chunk.seq.seq_id in self._requests:
                    self._fail(self._requests[chunk.seq.seq_id], e)
            return
        self.num_steps += 1
        self.num_prefill_tokens += sum(c.num_new_tokens for c in plan.prefills)
        for chunk in plan.prefills:  # usage reports the cache hit of the first admission
            request = self._requests.get(chunk.seq.seq_id)
            if request is not None and request.num_cached_prompt_tokens is None:
                request.num_cached_prompt_tokens = chunk.seq.num_cached_tokens
        self.num_decode_tokens += len(plan.decodes)
        self.scheduler.on_step_done(plan)
        for seq, token_id in output.sampled:
            request = self._requests.get(seq.seq_id)
            if request is not None:
                self._on_token(request, token_id)
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.is_scoring and seq.num_computed_tokens == seq.num_tokens and seq.seq_id in self._requests:
                self._finish(self._requests[seq.seq_id], "length")

    def _on_token(self, request: Request, token_id: int) -> None:
        seq = request.seq
        if seq.params.max_tokens == 0:  # prefill only (e.g. to warm the prefix cache): keep no token
            self._finish(request, "length")
            return
        seq.token_ids.append(token_id)
        request.mark_first_token()
        grammar_done = False
        if seq.constraint is not None:  # structured output: advance the grammar (local/grammar.py)
            try:
                grammar_done = seq.constraint.advance(token_id)
            except GrammarViolationError as e:
                self._fail(request, e)
                return
        try:
            stop_hit = False
            if request.stream is not None:
                with self._tok_lock:
                    delta, stop_hit = request.stream.push(token_id)
                if request.handle is not None:
                    request.handle.emit(delta)
        except Exception as e:  # a detokenizer failure ends this request only
            self._fail(request, e)
            return
        if stop_hit or grammar_done or (token_id in self.eos_token_ids and not seq.params.ignore_eos):
            self._finish(request, "stop")
        elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= seq.max_len:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        self._requests.pop(request.seq.seq_id, None)
        self.scheduler.finish(request.seq)
        if request.stream is not None and reason != "stop" and request.handle is not None:
            with self._tok_lock:
                request.handle.emit(request.stream.flush())
        request.complete(reason)

    def _fail(self, request: Request, error: BaseException) -> None:
        self._requests.pop(request.seq.seq_id, None)
        self.scheduler.finish(request.seq)
        request.fail(error)


def _check_seams(config: EngineConfig) -> None:
    """Fail at construction (not at the first request) for a prefill path or KV policy that is not there."""
    if config.prefill_attention not in PREFILL_PATHS:
        raise ConfigError(
            f"prefill_attention={config.prefill_attention!r} is not a registered prefill path "
            f"(known: {sorted(PREFILL_PATHS)}); use 'dense' or register the path first"
        )
    if config.default_streaming_kv is not None:
        try:
            policy_for(config.default_streaming_kv)
        except InvalidRequestError as e:
            raise ConfigError(f"default_streaming_kv: {e}") from e


def _make_config(config_fields: dict[str, Any]) -> EngineConfig:
    known = {f.name for f in fields(EngineConfig)}
    unknown = sorted(set(config_fields) - known)
    if unknown:
        raise ConfigError(f"unknown EngineConfig fields {unknown}; known fields: {sorted(known)}")
    return EngineConfig(**config_fields)

