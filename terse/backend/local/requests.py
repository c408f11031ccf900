"""Request bookkeeping of the engine loop and the checks a prompt passes before it is queued."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from terse.backend.handle import RequestHandle
from terse.backend.local.kv_policy import KVPolicy
from terse.backend.local.sequence import Sequence
from terse.backend.textstream import TextStream
from terse.backend.types import Completion, FinishReason, SamplingParams, TokenLogprob, Usage
from terse.errors import InvalidRequestError


@dataclass
class Request:
    """A sequence plus where its results go: a handle (generation) or a future (scoring)."""

    seq: Sequence
    handle: RequestHandle | None
    stream: TextStream | None
    future: Future[list[float]] | None = None
    submit_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    num_cached_prompt_tokens: int | None = None
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    """Generated tokens' log-probabilities, when the request asked for them."""

    def mark_first_token(self) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()

    def complete(self, reason: str) -> None:
        seq = self.seq
        if self.future is not None:
            if reason == "abort":
                self.future.cancel()
            else:
                self.future.set_result(list(seq.prompt_logprobs))
            return
        if self.handle is None:
            return
        now = time.perf_counter()
        metrics = {"latency": now - self.submit_time}
        if self.first_token_time is not None:
            metrics["ttft"] = self.first_token_time - self.submit_time
        finish: FinishReason = "stop" if reason == "stop" else "abort" if reason == "abort" else "length"
        cached = self.num_cached_prompt_tokens
        usage = Usage(
            prompt_tokens=seq.num_prompt_tokens,
            cached_prompt_tokens=min(seq.num_cached_tokens if cached is None else cached, seq.num_prompt_tokens),
            completion_tokens=seq.num_output_tokens,
            num_draft_tokens=seq.num_draft_tokens,
            num_accepted_tokens=seq.num_accepted_tokens,
        )
        text = self.stream.text if self.stream is not None else ""
        logprobs = tuple(self.token_logprobs) if seq.params.logprobs is not None else None
        self.handle.finish(Completion(text, tuple(seq.output_ids), finish, usage, metrics, logprobs))

    def fail(self, error: BaseException) -> None:
        if self.future is not None:
            self.future.set_exception(error)
        elif self.handle is not None:
            self.handle.fail(error)


def validate_prompt(seq: Sequence, policy: KVPolicy, max_model_len: int, num_blocks: int, block_size: int) -> None:
    """Raise `InvalidRequestError` (naming the value, the limit and the fix) for a request that can never run."""
    num_prompt = seq.num_prompt_tokens
    max_tokens = seq.params.max_tokens
    if num_prompt == 0:
        raise InvalidRequestError("prompt is empty (0 tokens); give at least one token", param="prompt")
    if num_prompt >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {num_prompt} tokens but max_model_len={max_model_len} leaves no room to generate; "
            f"shorten the prompt below {max_model_len} tokens or raise EngineConfig.max_model_len",
            param="prompt",
        )
    if num_prompt + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"max_tokens={max_tokens} with a {num_prompt}-token prompt exceeds max_model_len={max_model_len}; "
            f"use max_tokens <= {max_model_len - num_prompt}",
            param="max_tokens",
        )
    needed = policy.max_blocks(seq, block_size)
    if needed > num_blocks:
        raise InvalidRequestError(
            f"this request may need {needed} KV blocks ({num_prompt} prompt + {max_tokens} new tokens) but the "
            f"pool holds {num_blocks}; lower max_tokens or give the engine more kv_cache_memory / num_kv_blocks",
            param="max_tokens",
        )


def max_new_tokens(
    num_prompt: int, params: SamplingParams, policy: KVPolicy, max_model_len: int, num_blocks: int, block_size: int
) -> int:
    """The largest max_tokens `validate_prompt` accepts for a prompt of `num_prompt` tokens (0: none).

    Bounded by the context (max_model_len - num_prompt) and by the KV pool under `policy`: a dense
    sequence needs ceil((prompt + max_tokens) / block_size) blocks; a streaming one stops growing.
    """
    room = max_model_len - num_prompt
    if num_prompt == 0 or room <= 0:
        return 0

    def fits(max_tokens: int) -> bool:
        probe = Sequence(-1, [0] * num_prompt, dataclasses.replace(params, max_tokens=max_tokens), max_model_len)
        return policy.max_blocks(probe, block_size) <= num_blocks

    if fits(room):
        return room
    low, high = 0, room  # fits(low) or low == 0; not fits(high); max_blocks grows with max_tokens
    if not fits(low):
        return 0
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
