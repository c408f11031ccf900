"""The engine's structured-output hook: per-request grammar masks inside batched decoding.

The whole hook, and every line of the engine that touches it:

    engine.submit          seq.constraint = grammar_state(compiler, params,    (compiles on the caller's
                                                          room)               thread; a bad schema, or a
                                                                              max_tokens below the shortest
                                                                              complete output, raises
                                                                              InvalidRequestError there)
    runner.launch          constrained rows keep their hidden states           (free rows sample at once)
    engine._on_token       finished = seq.constraint.advance(token_id)         grammar done -> finish "stop"
                                                                              ("length" if the budget
                                                                              closed it)
    runner.sample_late     masks = runner.grammar_masks.begin(late_seqs)       after the step before was
                           masks.apply(logits)                                 collected: logits [L, V]
                           masks.check(ids)                                    budget checks (see below)

The engine loop launches step N+1 before step N's tokens reach the host, and a mask needs the grammar
advanced by the token before it; so a constrained row runs its forward in step N+1 with everyone else,
and is masked and sampled once step N was collected, before step N+2 is launched (runner.py). `begin`
hands the mask computation to a worker thread, so it runs while the constrained rows' lm_head runs
(llguidance and torch both release the GIL; a few rows are filled inline instead, see
MIN_ROWS_ON_WORKER); `apply` waits for it and sets disallowed logits to -inf on the constrained rows.
Logits are computed outside the captured CUDA graphs, so graphs are unaffected. A sequence's grammar
state follows its token ids: preemption by recomputation, the prefix cache and streaming KV never change
the tokens, so they never touch the state.

Budget-aware closing (terse.backend.budget): the worker also makes each constrained row's budget decision
before filling its mask (a row that must close gets a one-token mask), and `check` looks at the sampled
tokens of rows within reach of their budget, replacing one that would leave no room to complete the
grammar. That check reads those rows' ids back before the next launch: a synchronisation per step on a
GPU, only while some constrained request is that close to its max_tokens.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Sequence as Seq

import torch
from transformers import PreTrainedTokenizerBase

from terse.backend.grammar import ConstraintState, GrammarCompiler, GrammarRows, bitmask_width
from terse.backend.local.sequence import Sequence
from terse.backend.sampling import apply_token_bitmask
from terse.backend.types import SamplingParams
from terse.errors import UnsupportedOperationError

_worker: concurrent.futures.ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _mask_worker() -> concurrent.futures.ThreadPoolExecutor:
    """One thread per process computes masks for every engine (each step waits for its own)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="terse-grammar")
        return _worker


def grammar_compiler(
    tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, eos_token_ids: Seq[int]
) -> GrammarCompiler | None:
    """The engine's compiler (None without a tokenizer: such engines refuse constrained requests)."""
    return GrammarCompiler(tokenizer, vocab_size, eos_token_ids) if tokenizer is not None else None


def grammar_state(
    compiler: GrammarCompiler | None, params: SamplingParams, room: int | None = None
) -> ConstraintState | None:
    """The request's grammar state at its start, or None for an unconstrained request. `room`: tokens
    of context left after the prompt. Raises `InvalidRequestError` (param max_tokens) when the budget
    cannot hold the grammar's shortest complete output."""
    if params.constraint is None:
        return None
    if compiler is None:
        raise UnsupportedOperationError(
            "structured output (SamplingParams.constraint) needs a tokenizer; this engine was built without one"
        )
    state = compiler.compile(params.constraint)
    state.check_budget(params.max_tokens, room)
    return state


def remaining_tokens(seq: Sequence) -> int:
    """Tokens the sequence may still generate, the one being sampled included (its pending token is
    the one being sampled; earlier ones have reached the host)."""
    num_resolved = seq.num_tokens - seq.num_pending_tokens
    return min(seq.params.max_tokens - (num_resolved - seq.num_prompt_tokens), seq.max_len - num_resolved)


MIN_ROWS_ON_WORKER = 4
"""Fewer constrained rows are filled inline in `apply` (tens of microseconds each): handing them to a
thread costs more on a busy host than it saves. On CUDA inline filling still overlaps the device, which
is running the step's forward pass meanwhile."""


class PendingMasks:
    """Masks of one step being computed; `apply` waits for them."""

    def __init__(
        self,
        future: concurrent.futures.Future[None] | None,
        bitmask: torch.Tensor,
        rows: list[int],
        grammar_rows: GrammarRows,
    ) -> None:
        self._future = future
        self._bitmask = bitmask
        self._grammar_rows = grammar_rows
        self.rows = rows
        """Rows of the step's sampled logits that are constrained, in bitmask order."""

    def apply(self, logits: torch.Tensor) -> None:
        """logits: [N, V] of the step's sampled sequences (same order as `begin`), masked in place."""
        if self._future is None:
            self._grammar_rows.fill(self._bitmask)
        else:
            self._future.result()
        apply_token_bitmask(logits, self._bitmask, self.rows)

    def check(self, ids: torch.Tensor) -> None:
        """ids: [N] sampled from the masked logits; budget checks of the constrained rows, in place."""
        self._grammar_rows.check(ids, self.rows)


class GrammarMasks:
    """Owns the host bitmask buffer of one engine; see the module docstring for the hook."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._width = bitmask_width(vocab_size)
        self._buffer = torch.empty(0, self._width, dtype=torch.int32)

    def _bitmask(self, num_rows: int) -> torch.Tensor:
        # Reused between steps: the previous step's host-to-device copy was queued before its results'
        # event, and that event was waited for (the step collected) before this step's late sampling.
        if self._buffer.shape[0] < num_rows:
            pin = self.device.type == "cuda"
            self._buffer = torch.empty(max(num_rows, 2 * self._buffer.shape[0]), self._width, dtype=torch.int32,
                                       pin_memory=pin)
        return self._buffer

    def begin(self, seqs: Seq[Sequence]) -> PendingMasks | None:
        """Start computing the masks of the constrained sequences among the step's sampled `seqs`
        (None when there are none). Their grammar states must not advance until `apply` returned."""
        rows = [i for i, s in enumerate(seqs) if s.constraint is not None]
        if not rows:
            return None
        states: list[ConstraintState] = [seqs[i].constraint for i in rows]
        grammar_rows = GrammarRows(states, [remaining_tokens(seqs[i]) for i in rows])
        bitmask = self._bitmask(len(rows))
        future = _mask_worker().submit(grammar_rows.fill, bitmask) if len(rows) >= MIN_ROWS_ON_WORKER else None
        return PendingMasks(future, bitmask, rows, grammar_rows)
