"""`LocalEngine`: terse's own inference engine behind the `Backend` contract.

One loop thread owns the scheduler, the KV manager and the model; other threads talk to it through a
queue of commands (add a request, cancel one). The loop keeps the device busy while the host works:

    host:    schedule N+1 | launch N+1 | wait N, stream N's tokens | schedule N+2 | launch N+2 | wait N+1 ...
    device:  ....... step N ........ | ........ step N+1 ........ | ........ step N+2 ......

Step N+1 is scheduled and launched before step N's sampled tokens reach the host: a sequence decoding
in step N+1 takes its input token from step N's sampled ids on the device (the host holds a
`PENDING_TOKEN` placeholder until step N is collected). Only then are its tokens turned into text
deltas, stops and completions. A sequence that stops at step N (end-of-sequence, a stop string) has
computed one extra token in step N+1, which is dropped; length limits are known ahead and cost nothing.

Structured output keeps that overlap. A constrained sequence's mask for step N+1 needs its step-N token,
so step N+1 runs its forward like any other but samples the constrained rows only once step N was
collected and its tokens advanced the grammars (`ModelRunner.sample_late`), before step N+2 is launched:

    host:    launch N+1 (free rows sampled) | wait N, advance grammars | mask + sample N+1's constrained rows | ...

Log-probabilities (`SamplingParams.logprobs`) are computed on the device beside the sampled ids, for the
rows that ask only, and come back with them.

Speculative decoding (`EngineConfig.speculative`, speculative.py) keeps the overlap too: drafts for step
N+1 are built on what step N is assumed to yield and checked on the device; a collected step hands each
sequence its accepted draft tokens plus one, which are streamed, stopped and counted one by one, and the
KV manager rolls back the blocks of rejected positions. A request that fails (bad tokens, a detokenizer error, a failed step) fails its own handle; the loop
keeps going.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from terse.backend.base import BackendBase
from terse.backend.grammar import GrammarViolationError
from terse.backend.handle import RequestHandle
from terse.backend.local.attention import AttentionBackend, DecodeFn, triton_decode_supported
from terse.backend.local.build import num_kv_blocks, resolve_device, resolve_dtype, resolve_max_model_len
from terse.backend.local.config import MODEL_PATTERNS_FILE, EngineConfig
from terse.backend.local.grammar import grammar_compiler, grammar_state
from terse.backend.local.kv_cache import BlockAllocator, KVCachePool
from terse.backend.local.kv_manager import KVManager
from terse.backend.local.kv_policy import policy_for
from terse.backend.local.models.llama import LlamaForCausalLM, ModelConfig
from terse.backend.local.models.loader import load_model, random_model, read_model_config, resolve_model_dir
from terse.backend.local.models.ops import choose_ops
from terse.backend.local.prefix_cache import RadixPrefixCache
from terse.backend.local.quant.transform import apply_quantization
from terse.backend.local.requests import Request, max_new_tokens, validate_prompt
from terse.backend.local.runner import ModelRunner, StepHandle
from terse.backend.local.scheduler import Scheduler, StepPlan
from terse.backend.local.sequence import Sequence as Seq
from terse.backend.local.sparse_prefill import build_sparse_prefill
from terse.backend.local.speculative import Speculator
from terse.backend.sampling import make_generator
from terse.backend.textstream import TextStream
from terse.backend.tokenization import (
    check_token_ids,
    context_ids,
    encode_plain,
    encode_prompt,
    eos_token_ids,
    load_tokenizer,
    num_added_tokens,
    render_chat_template,
)
from terse.backend.types import Message, SamplingParams, TokenLogprob, TokenScores
from terse.errors import BackendUnavailableError, InvalidRequestError, UnsupportedOperationError
from terse.kernels.decode_reference import paged_decode_reference

_SCORE_PARAMS = SamplingParams(max_tokens=0)


@dataclass
class EngineParts:
    """What the engine wires together (built by `LocalEngine.from_spec` / `from_random`)."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase | None
    model_name: str


class LocalEngine(BackendBase):
    """Continuous-batching engine over a paged, prefix-shared KV cache. Thread-safe."""

    def __init__(self, parts: EngineParts, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self._model_name = parts.model_name
        self.tokenizer = parts.tokenizer
        self._tok_lock = threading.Lock()  # Rust tokenizers may refuse concurrent use
        model, model_config = parts.model, parts.model.config
        self.model_config = model_config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._max_model_len = resolve_max_model_len(config, model_config)
        model.setup_rope(self._max_model_len, self.device)
        model.ops = choose_ops(self.device, self.dtype, model_config.head_dim)
        self.num_kv_blocks = num_kv_blocks(config, model_config, self._max_model_len, self.dtype, self.device)
        self.pool = KVCachePool(
            num_layers=model_config.num_layers, num_blocks=self.num_kv_blocks, block_size=config.kv_block_size,
            num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, dtype=self.dtype,
            device=self.device,
        )
        self.kv = KVManager(
            self.num_kv_blocks, config.kv_block_size, enable_prefix_cache=config.enable_prefix_cache,
            default_streaming_kv=config.default_streaming_kv,
        )
        self.scheduler = Scheduler(
            self.kv, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            hold_drafting=config.speculative is not None and not config.speculative.draft_ahead,
        )
        decode = self._decode_kernel()
        attention = AttentionBackend(
            decode=decode, block_size=config.kv_block_size, group_decode_rows=decode is paged_decode_reference,
            num_q_per_kv=model_config.num_heads // model_config.num_kv_heads, device=self.device,
            sparse_prefill=build_sparse_prefill(
                config.sparse_prefill, parts.model_name, model_config.num_layers, model_config.num_heads
            ),
        )
        self.runner = ModelRunner(model, self.pool, attention, device=self.device, max_model_len=self._max_model_len)
        if self.device.type == "cuda" and config.enable_cuda_graphs:
            rows_per_seq = 1 + (config.speculative.num_draft_tokens if config.speculative is not None else 0)
            blas = config.cuda_graph_blas
            if blas == "auto" and self.dtype == torch.float32:
                blas = "cublas"  # float32 keeps torch's default library: the parity anchor's products
            self.runner.capture_cuda_graphs(
                min(config.max_cuda_graph_batch_size, config.max_num_seqs * rows_per_seq), blas=blas)
        tok = self.tokenizer
        self.eos_token_ids = eos_token_ids(tok, model_config) if tok is not None else frozenset(model_config.eos_token_ids)
        self._bos_context = context_ids(tok) if tok is not None else []
        self._grammar = grammar_compiler(tok, model_config.vocab_size, sorted(self.eos_token_ids))
        self.speculator = Speculator(config.speculative, self.kv) if config.speculative is not None else None
        self._requests: dict[int, Request] = {}
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._ids = itertools.count()
        self._closed = False
        self.num_steps = 0
        self.num_prefill_tokens = 0
        self.num_decode_tokens = 0
        self.num_failed_steps = 0
        self.host_seconds = {"schedule": 0.0, "launch": 0.0, "wait": 0.0, "process": 0.0, "late": 0.0}
        """Loop-thread time by phase: scheduling, launching (inputs, graph replay, sampling calls), waiting
        for the device, turning tokens into text / completions, and masking + sampling constrained rows."""
        self._thread = threading.Thread(target=self._loop, name="terse-engine", daemon=True)
        self._thread.start()

    def _decode_kernel(self) -> DecodeFn:
        if self.device.type == "cuda" and triton_decode_supported(self.config.kv_block_size, self.model_config.head_dim):
            from terse.kernels.paged_decode import paged_decode_triton

            return paged_decode_triton
        return paged_decode_reference

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, target: str, **config_fields: Any) -> LocalEngine:
        """`local:<dir-or-hub-name>`: load the model and tokenizer; `config_fields` are EngineConfig fields
        (see `EngineConfig.from_options`). Sparse prefill without a patterns file takes the model
        directory's `sparse_patterns.json` when there is one."""
        config = EngineConfig.from_options(config_fields)
        model_dir = resolve_model_dir(target)
        saved = model_dir / MODEL_PATTERNS_FILE
        if config.sparse_prefill.enabled and config.sparse_prefill.patterns_path is None and saved.is_file():
            config = replace(config, sparse_prefill=replace(config.sparse_prefill, patterns_path=str(saved)))
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
        policy = self.kv.policy(seq)
        validate_prompt(seq, policy, self._max_model_len, self.num_kv_blocks, self.config.kv_block_size)
        seq.generator = make_generator(params.seed, self.device)
        seq.constraint = grammar_state(self._grammar, params, seq.max_len - seq.num_prompt_tokens)  # local/grammar.py
        if self.speculator is not None:
            self.speculator.attach(seq)  # indexes the prompt here, not on the loop thread
        handle = RequestHandle(f"local-{seq.seq_id}", on_cancel=lambda: self._send("cancel", seq.seq_id))
        stream = TextStream(self.tokenizer, params.stop, prompt_ids) if self.tokenizer is not None else None
        self._send("add", (Request(seq, handle, stream), None))
        return handle

    def max_new_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """Most tokens a prompt of `num_prompt_tokens` may generate: context room and what the KV pool
        holds. The count is of the prompt as submitted: a text prompt's `count_tokens()` plus
        `num_added_tokens()`."""
        policy = policy_for(params.streaming_kv or self.kv.default_streaming_kv)
        return max_new_tokens(
            num_prompt_tokens, params, policy, self._max_model_len, self.num_kv_blocks, self.config.kv_block_size
        )

    def num_added_tokens(self, prompt: str) -> int:
        """Special tokens `submit(prompt)` adds to the `count_tokens(prompt)` tokens of a text prompt (BOS
        for most models; none when the prompt already starts with BOS)."""
        tok = self._require_tokenizer("num_added_tokens()")
        with self._tok_lock:
            return num_added_tokens(tok, prompt)

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
            self._send("add", (Request(seq, None, None), future))
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
        check_token_ids(token_ids, max(len(tok), self.model_config.vocab_size), "tokens")  # any id it generates
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
    def allocator(self) -> BlockAllocator:
        """The KV manager's block allocator, for inspection (tests, metrics): never allocate through it."""
        return self.kv.allocator

    @property
    def prefix_cache(self) -> RadixPrefixCache | None:
        """The KV manager's prefix cache, for inspection (None when off)."""
        return self.kv.prefix_cache

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of admitted prompt tokens whose KV came from the prefix cache (0.0 before any request)."""
        admitted = self.kv.num_admitted_prompt_tokens
        return self.kv.num_cached_tokens / admitted if admitted else 0.0

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start (steps, prefill/decode/cached tokens, preemptions, failed steps, decode
        inputs taken on the device from the step before, constrained rows sampled late) and gauges read
        now (requests running / waiting, KV blocks in the pool / free / held by the prefix cache / in use).
        Speculative decoding: draft tokens verified and accepted, sequence-steps that verified a draft, and
        drafts voided because they rested on a wrong guess of the step still in flight.
        Read-only and lock-free: a reading taken while a step runs may be one step stale."""
        spec = self.speculator
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_kv_blocks": self.num_kv_blocks,
            "num_free_kv_blocks": self.kv.num_free_blocks,
            "num_cached_kv_blocks": self.kv.num_cached_blocks,
            "num_kv_blocks_used": self.kv.num_used_blocks,
            "num_steps": self.num_steps,
            "num_prefill_tokens": self.num_prefill_tokens,
            "num_decode_tokens": self.num_decode_tokens,
            "num_cached_tokens": self.kv.num_cached_tokens,
            "num_admitted_prompt_tokens": self.kv.num_admitted_prompt_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_failed_steps": self.num_failed_steps,
            "num_device_inputs": self.runner.num_device_inputs,
            "num_late_samples": self.runner.num_late_samples,
            "num_draft_tokens": spec.num_draft_tokens if spec is not None else 0,
            "num_accepted_tokens": spec.num_accepted_tokens if spec is not None else 0,
            "num_verify_steps": spec.num_verify_steps if spec is not None else 0,
            "num_voided_drafts": spec.num_voided_drafts if spec is not None else 0,
            "num_shadow_drafts": spec.num_shadow_drafts if spec is not None else 0,
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
        check_token_ids(ids, self.model_config.vocab_size, "prompt")
        return ids

    def _send(self, kind: str, payload: Any) -> None:
        if self._closed:
            raise BackendUnavailableError("the local engine is closed; build a new one")
        self._inbox.put((kind, payload))
        self._wakeup.set()

    # -- the loop thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        inflight: StepHandle | None = None
        while not self._closed:
            self._drain_inbox()
            launched = self._launch() if self.scheduler.has_work() else None
            previous, inflight = inflight, launched
            if previous is not None:
                self._complete(previous)  # the device is already busy with `launched`
            if launched is not None and launched.late is not None:
                self._sample_late(launched)  # `previous`'s tokens have advanced the grammars
            if launched is None:
                if not self.scheduler.has_work():
                    self._wakeup.wait(timeout=0.1)
                    self._wakeup.clear()
                elif previous is None:
                    time.sleep(0.001)  # nothing schedulable and nothing in flight: do not spin
        if inflight is not None:
            self._complete(inflight)
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
                self.scheduler.add(request.seq)
            elif kind == "cancel" and payload in self._requests:
                self._finish(self._requests[payload], "abort")

    def _launch(self) -> StepHandle | None:
        """Schedule the next step and queue it on the device; None when there is nothing to run."""
        t0 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        plan = self.scheduler.schedule()
        t1 = time.perf_counter()
        self.host_seconds["schedule"] += t1 - t0
        if plan.is_empty:
            return None
        try:
            handle = self.runner.launch(plan)
        except Exception as e:  # a failed step fails the requests in it, not the engine
            self._fail_step(plan, e)
            return None
        self.scheduler.on_step_launched(plan)
        for seq in handle.sampled_seqs:
            seq.append_pending()
        if self.speculator is not None:
            self.speculator.on_launched(plan, handle.sampled_seqs)
        self.num_steps += 1
        self.num_decode_tokens += sum(c.num_new_tokens for c in plan.decodes)
        self.num_prefill_tokens += sum(c.num_new_tokens for c in plan.prefills)
        for chunk in plan.prefills:  # usage reports the cache hit of the first admission
            request = self._requests.get(chunk.seq.seq_id)
            if request is not None and request.num_cached_prompt_tokens is None:
                request.num_cached_prompt_tokens = chunk.seq.num_cached_tokens
        self.host_seconds["launch"] += time.perf_counter() - t1
        return handle

    def _complete(self, handle: StepHandle) -> None:
        """Collect a launched step: stream its tokens, record its scores, finish what ended."""
        t0 = time.perf_counter()
        try:
            output = handle.wait()
        except Exception as e:  # an error raised on the device surfaces here
            self._fail_step(handle.plan, e)
            return
        t1 = time.perf_counter()
        self.host_seconds["wait"] += t1 - t0
        current = handle.preemptions_at_launch
        for (seq, token_ids), logprobs, num_accepted in zip(output.sampled, output.logprobs, output.accepted):
            request = self._requests.get(seq.seq_id)
            if request is not None:
                self._on_tokens(request, token_ids, logprobs, num_accepted, seq.num_preemptions == current[seq.seq_id])
        for seq, score in output.scores:  # not after a preemption: the recompute scores again
            if seq.seq_id in self._requests and seq.num_preemptions == current[seq.seq_id]:
                seq.prompt_logprobs.append(score)
        for seq in handle.completed_seqs:  # scored or prefilled: nothing to sample, the request is done
            if seq.seq_id in self._requests and seq.num_preemptions == current[seq.seq_id]:
                self._finish(self._requests[seq.seq_id], "length")
        self.host_seconds["process"] += time.perf_counter() - t1

    def _sample_late(self, handle: StepHandle) -> None:
        """Mask and sample the constrained rows of the step just launched (runner.py)."""
        t0 = time.perf_counter()
        try:
            self.runner.sample_late(handle)
        except Exception as e:  # a failed mask fails the step's requests now, before the next launch
            handle.discard()
            self._fail_step(handle.plan, e)
        self.host_seconds["late"] += time.perf_counter() - t0

    def _on_tokens(
        self, request: Request, token_ids: list[int], logprobs: list[TokenLogprob | None], num_accepted: int,
        kv_kept: bool,
    ) -> None:
        """A collected step's tokens for one request: its sampled token, or its accepted draft tokens and
        the one after them. `kv_kept`: the sequence was not preempted since the step was launched."""
        seq = request.seq
        if self.speculator is not None:
            self.speculator.on_collected(seq, token_ids, num_accepted)
        if kv_kept:
            seq.num_computed_tokens += num_accepted  # the accepted draft positions hold valid KV
        for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs)):
            if i == 0:
                seq.resolve_pending(token_id)
            else:
                seq.insert_resolved(token_id)
            if not self._on_token(request, token_id, logprob):
                return
        if kv_kept and seq.spec is not None:
            # rejected draft positions: keep what is computed and what the step in flight may still use
            self.kv.rollback(seq, seq.num_computed_tokens + seq.num_speculative_tokens)

    def _on_token(self, request: Request, token_id: int, logprob: TokenLogprob | None = None) -> bool:
        """One resolved token: grammar, text delta, stops. False once the request ended."""
        seq = request.seq
        request.mark_first_token()
        grammar_done = False
        if seq.constraint is not None:  # structured output: advance the grammar (local/grammar.py)
            try:
                grammar_done = seq.constraint.advance(token_id)
            except GrammarViolationError as e:
                self._fail(request, e)
                return False
        ends = token_id in self.eos_token_ids and not seq.params.ignore_eos
        logprobs = (logprob,) if logprob is not None and not ends else ()  # an ending EOS is no output
        request.token_logprobs.extend(logprobs)
        try:
            stop_hit = False
            if request.stream is not None:
                with self._tok_lock:
                    delta, stop_hit = request.stream.push(token_id)
                if request.handle is not None:
                    request.handle.emit(delta, logprobs)
        except Exception as e:  # a detokenizer failure ends this request only
            self._fail(request, e)
            return False
        num_resolved = seq.num_tokens - seq.num_pending_tokens
        if stop_hit or grammar_done or ends:  # a grammar the budget closed ends "length" (local/grammar.py)
            closed = not stop_hit and seq.constraint is not None and seq.constraint.closed_by_budget
            self._finish(request, "length" if closed else "stop")
        elif num_resolved - seq.num_prompt_tokens >= seq.params.max_tokens or num_resolved >= seq.max_len:
            self._finish(request, "length")
        else:
            return True
        return False

    def _finish(self, request: Request, reason: str) -> None:
        self._requests.pop(request.seq.seq_id, None)
        request.seq.drop_pending()
        self.scheduler.finish(request.seq)
        if request.stream is not None and reason != "stop" and request.handle is not None:
            with self._tok_lock:
                request.handle.emit(request.stream.flush())
        request.complete(reason)

    def _fail(self, request: Request, error: BaseException) -> None:
        self._requests.pop(request.seq.seq_id, None)
        request.seq.drop_pending()
        self.scheduler.finish(request.seq)
        request.fail(error)

    def _fail_step(self, plan: StepPlan, error: BaseException) -> None:
        self.num_failed_steps += 1
        for chunk in plan.chunks:
            if chunk.seq.seq_id in self._requests:
                self._fail(self._requests[chunk.seq.seq_id], error)
