"""`HFBackend`: the Backend contract over any transformers causal LM, with padded static batches.

The path for architectures outside the local engine's Llama family (GPT-2 as a compression scorer,
say) and a reference to compare the engine against. One worker thread takes every waiting request
(up to `max_batch_size`), left-pads them into one batch, prefills, then decodes step by step with the
model's KV cache; requests that arrive meanwhile wait for the next batch. Each row has its own
sampling parameters, seed, stop strings, cancellation and structured-output constraint (the local
engine's llguidance masks, applied to that row's logits only).
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from terse.backend.attention_kernels import no_cudnn_attention
from terse.backend.base import BackendBase
from terse.backend.grammar import (
    ConstraintState,
    GrammarCompiler,
    GrammarRows,
    GrammarViolationError,
    bitmask_width,
)
from terse.backend.handle import RequestHandle
from terse.backend.sampling import apply_token_bitmask, make_generator, sample_next, sampled_logprobs
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
from terse.backend.types import (
    Completion,
    FinishReason,
    Message,
    SamplingParams,
    TokenLogprob,
    TokenScores,
    Usage,
)
from terse.errors import ConfigError, InvalidRequestError, ModelLoadError

_BATCH_WINDOW_S = 0.005  # how long the worker waits for more requests before starting a batch
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Request:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    grammar: ConstraintState | None = None
    """Structured output: the row's grammar state (same masks as the local engine)."""
    submitted_at: float = field(default_factory=time.perf_counter)


class HFBackend(BackendBase):
    """Any transformers causal LM behind the Backend contract (see terse.backend.base)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_size: int = 16,
        score_batch_size: int = 8,
    ) -> None:
        if max_batch_size < 1 or score_batch_size < 1:
            raise ConfigError(
                f"max_batch_size={max_batch_size}, score_batch_size={score_batch_size}: both must be >= 1"
            )
        if dtype != "auto" and dtype not in _DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not one of 'auto', {', '.join(map(repr, _DTYPES))}")
        self._device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                    ("cpu" if device == "auto" else device))
        torch_dtype = _DTYPES.get(dtype, torch.float32 if self._device.type == "cpu" else torch.bfloat16)
        self._name = str(model_path)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(model_path)
        self.model: PreTrainedModel = _load_model(model_path, torch_dtype, self._device)
        self._eos_ids = eos_token_ids(self.tokenizer, self.model.config)
        self._pad_id = self._pick_pad_id()
        self._max_len = _model_max_len(self.model.config)
        self._vocab_size = int(self.model.get_output_embeddings().weight.shape[0])  # logits width
        self._grammar = GrammarCompiler(self.tokenizer, self._vocab_size, sorted(self._eos_ids))
        self._max_batch_size = max_batch_size
        self._score_batch_size = score_batch_size
        self._ids = itertools.count()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._model_lock = threading.Lock()  # the worker and score() share the model
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name="terse-hf-worker", daemon=True)
        self._worker.start()

    @classmethod
    def from_spec(cls, target: str, **config: Any) -> HFBackend:
        return cls(target, **config)

    # -- contract ------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._name

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def submit(self, prompt: str | Sequence[int], params: SamplingParams) -> RequestHandle:
        if self._closed:
            raise InvalidRequestError("this backend is closed; create a new one")
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequestError("the prompt is empty; give at least one token of text")
        prompt_ids = encode_prompt(self.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
        if not isinstance(prompt, str):
            check_token_ids(prompt_ids, int(self.model.config.vocab_size), "prompt")
        _validate_prompt(prompt_ids, params, self._max_len)
        grammar = self._grammar.compile(params.constraint) if params.constraint is not None else None
        if grammar is not None:  # the budget must hold the shortest complete output (terse.backend.budget)
            grammar.check_budget(params.max_tokens, self._max_len - len(prompt_ids))
        handle = RequestHandle(f"hf-{next(self._ids)}")
        self._queue.put(_Request(handle, prompt_ids, params, grammar))
        return handle

    def score(self, texts: Sequence[str], *, prefix: str = "") -> list[TokenScores]:
        ctx = encode_prompt(self.tokenizer, prefix) if prefix else context_ids(self.tokenizer)
        results: list[TokenScores] = []
        for start in range(0, len(texts), self._score_batch_size):
            results.extend(self._score_batch(ctx, texts[start : start + self._score_batch_size]))
        return results

    def render_chat(self, messages: Sequence[Message]) -> str:
        return render_chat_template(self.tokenizer, messages)

    def encode(self, text: str) -> list[int]:
        return encode_plain(self.tokenizer, text)

    def num_added_tokens(self, prompt: str) -> int:
        """Special tokens `submit(prompt)` adds to the `count_tokens(prompt)` tokens of a text prompt (BOS
        for most models; none when the prompt already starts with BOS)."""
        return num_added_tokens(self.tokenizer, prompt)

    def decode(self, token_ids: Sequence[int]) -> str:
        check_token_ids(token_ids, max(len(self.tokenizer), int(self.model.config.vocab_size)), "tokens")
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join(timeout=30)

    # -- scoring -------------------------------------------------------------------------------------
    def _score_batch(self, ctx: list[int], texts: Sequence[str]) -> list[TokenScores]:
        encoded = [self.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
        rows = [ctx + list(e["input_ids"]) for e in encoded]
        for text, row in zip(texts, rows):
            if len(row) > self._max_len:
                raise InvalidRequestError(
                    f"prefix + text is {len(row)} tokens, over the model's {self._max_len}; "
                    f"score shorter pieces (text starts {text[:40]!r})"
                )
        width = max((len(r) for r in rows), default=0)
        if width == 0:
            return [TokenScores((), (), ()) for _ in texts]
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with self._model_lock, torch.inference_mode(), no_cudnn_attention(self._device):
            ids_on_device = input_ids.to(self._device)
            logits = self.model(input_ids=ids_on_device, attention_mask=mask.to(self._device)).logits  # [B, T, V]
            # log P(token t | tokens < t) for t >= 1, gathered on the device: only [B, T - 1] comes back
            picked = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids_on_device[:, 1:, None])
            logprobs = picked[..., 0].cpu().tolist()
        out: list[TokenScores] = []
        for i, e in enumerate(encoded):
            ids = list(e["input_ids"])
            row_logprobs = logprobs[i]
            # the token at position p is predicted from p - 1; position 0 has nothing to condition on
            values = [math.nan if len(ctx) + j == 0 else row_logprobs[len(ctx) + j - 1] for j in range(len(ids))]
            offsets = tuple((int(a), int(b)) for a, b in e["offset_mapping"])
            out.append(TokenScores(tuple(ids), tuple(values), offsets))
        return out

    # -- generation worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            # Callers submit a batch one request at a time; a short window lets it arrive whole.
            deadline = time.perf_counter() + _BATCH_WINDOW_S
            while len(batch) < self._max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            try:
                with self._model_lock:
                    self._run_batch(batch)
            except Exception as e:  # one failed batch fails its own requests, never the worker
                for req in batch:
                    req.handle.fail(e)

    def _run_batch(self, batch: list[_Request]) -> None:
        num_rows = len(batch)
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((num_rows, width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((num_rows, width), dtype=torch.long)
        for i, req in enumerate(batch):  # left padding: every row's last token is at the same column
            input_ids[i, width - len(req.prompt_ids) :] = torch.tensor(req.prompt_ids)
            mask[i, width - len(req.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self._device), mask.to(self._device)
        streams = [TextStream(self.tokenizer, r.params.stop, r.prompt_ids) for r in batch]
        gens = [make_generator(r.params.seed, self._device) for r in batch]
        outputs: list[list[int]] = [[] for _ in batch]
        finish: list[FinishReason | None] = [None] * num_rows
        first_token_at: list[float] = [0.0] * num_rows
        for i, req in enumerate(batch):
            if req.params.max_tokens == 0:
                finish[i] = "length"
        past: Any = None
        step_ids = input_ids
        bitmask = torch.empty(num_rows, bitmask_width(self._vocab_size), dtype=torch.int32)
        with torch.inference_mode(), no_cudnn_attention(self._device):
            while any(f is None for f in finish):
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
                out = self.model(
                    input_ids=step_ids, attention_mask=mask, position_ids=positions,
                    past_key_values=past, use_cache=True,
                )
                past = out.past_key_values
                logits = out.logits[:, -1, :]  # [B, V]
                grammars = [(i, r.grammar) for i, r in enumerate(batch) if r.grammar is not None and finish[i] is None]
                if grammars:  # grammar masks on the constrained live rows only, budget decisions first
                    left = [min(batch[i].params.max_tokens, self._max_len - width) - len(outputs[i]) for i, _ in grammars]
                    rows = GrammarRows([g for _, g in grammars], left)
                    rows.fill(bitmask)
                    apply_token_bitmask(logits, bitmask, [i for i, _ in grammars])
                next_ids = sample_next(logits, [r.params for r in batch], gens)
                if grammars:
                    rows.check(next_ids, [i for i, _ in grammars])  # budget-aware closing
                step_logprobs = sampled_logprobs(logits, next_ids, [r.params for r in batch])
                now = time.perf_counter()
                for i, req in enumerate(batch):
                    if finish[i] is None:
                        finish[i] = self._advance(req, streams[i], outputs[i], int(next_ids[i]), width, step_logprobs[i])
                        if len(outputs[i]) == 1:
                            first_token_at[i] = now
                step_ids = next_ids[:, None]
                mask = torch.cat([mask, mask.new_ones((num_rows, 1))], dim=1)
        for i, req in enumerate(batch):
            reason = finish[i]
            assert reason is not None
            req.handle.emit(streams[i].flush())
            done = time.perf_counter()
            metrics = {"latency": done - req.submitted_at}
            if outputs[i]:
                metrics["ttft"] = first_token_at[i] - req.submitted_at
            req.handle.finish(Completion(
                text=streams[i].text, token_ids=tuple(outputs[i]), finish_reason=reason,
                usage=Usage(len(req.prompt_ids), 0, len(outputs[i])), metrics=metrics,
                logprobs=tuple(req.handle.logprobs_since(0)) if req.params.logprobs is not None else None,
            ))

    def _advance(
        self, req: _Request, stream: TextStream, out: list[int], token: int, width: int,
        logprob: TokenLogprob | None = None,
    ) -> FinishReason | None:
        """Append one sampled token to a row; return why the row finished, or None to go on."""
        if req.handle.cancel_requested:
            return "abort"
        closed = req.grammar is not None and req.grammar.closed_by_budget  # the budget closed it: "length"
        if token in self._eos_ids and not req.params.ignore_eos:
            return "length" if closed else "stop"
        out.append(token)
        try:
            grammar_done = req.grammar is not None and req.grammar.advance(token)
        except GrammarViolationError as e:
            req.handle.fail(e)  # this row only; the batch goes on
            return "abort"
        delta, stopped = stream.push(token)
        req.handle.emit(delta, (logprob,) if logprob is not None else ())
        if stopped or grammar_done:
            return "length" if grammar_done and not stopped and closed else "stop"
        if len(out) >= req.params.max_tokens or width + len(out) >= self._max_len:
            return "length"
        return None

    def _pick_pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0


def _load_model(path: str | Path, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"could not load a causal LM from {str(path)!r}: {e}. Give a local model directory with "
            f"config.json and weights, or a hub name available offline"
        ) from e
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() as a decorator
    return model.eval()


def _model_max_len(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _validate_prompt(prompt_ids: list[int], params: SamplingParams, max_len: int) -> None:
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty; give at least one token of text")
    if len(prompt_ids) >= max_len:
        raise InvalidRequestError(
            f"the prompt is {len(prompt_ids)} tokens, but the model holds at most {max_len} "
            f"(prompt + completion); shorten or compress the prompt"
        )
