"""A launched step (`StepHandle`) and its host-side results (`StepOutput`).

The runner launches a step and returns at once; the handle carries what the step produces on the
device to pinned host memory, and the engine reads it with `wait()` while the next step runs:

    runner.launch(plan)        queue the forward, sample the free rows, keep the constrained rows' hidden
    runner.sample_late(handle) (only when the step has constrained rows) mask + sample them, once the
                               previous step's tokens advanced their grammars on the host
    handle.seal()              start the device -> host copies and record the event (done by the runner)
    handle.wait()              block until they arrived -> StepOutput

Sampled ids live in one device tensor [R], a row per token a sequence may yield: the free rows first
(a sequence verifying a draft has 1 + len(draft) of them), the constrained ("late") rows after them.
The next step reads its pending decode inputs from that tensor on the device (carry.py), so the late
rows must be sampled before the next step is launched (stream order then does the rest). A sequence
that verified a draft yields its first accepted + 1 rows' tokens (`accepted`, also copied to the host).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from terse.backend.local.scheduler import StepPlan
from terse.backend.local.sequence import Sequence
from terse.backend.sampling import LogprobRows
from terse.backend.types import TokenLogprob


@dataclass
class StepOutput:
    """Host-side results of one step."""

    sampled: list[tuple[Sequence, list[int]]] = field(default_factory=list)
    """(sequence, its new tokens) for each sequence whose chunk reached its last token: one token, or the
    accepted draft tokens plus one for a sequence that verified a draft."""
    logprobs: list[list[TokenLogprob | None]] = field(default_factory=list)
    """Parallel to `sampled`: each token's log-probabilities when its request asked for them, else None."""
    accepted: list[int] = field(default_factory=list)
    """Parallel to `sampled`: draft tokens accepted (0 without a draft)."""
    scores: list[tuple[Sequence, float]] = field(default_factory=list)
    """(scoring sequence, log-probability) per scored position, in position order."""


class LateRows(NamedTuple):
    """Constrained rows of a launched step, sampled by `ModelRunner.sample_late`."""

    seqs: list[Sequence]
    hidden: torch.Tensor
    """[L, hidden] their last hidden states (valid until the next step is launched)."""
    offset: int
    """Their first row in the step's sampled ids (the free rows come before)."""


def _host(values: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of device `values`, started without waiting (CPU tensors pass through)."""
    if values.device.type != "cuda":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    return host


def _to_host(values: torch.Tensor | None) -> torch.Tensor | None:
    return None if values is None else _host(values)


class StepHandle:
    """A launched step: its plan and its results on their way to the host. The runner seals it once
    every result is queued (at launch, or in `sample_late` for a step with constrained rows)."""

    def __init__(
        self, plan: StepPlan, sampled: list[Sequence], sampled_ids: torch.Tensor | None,
        scored: list[Sequence], scores: torch.Tensor | None, completed: list[Sequence],
        late: LateRows | None = None, first_rows: list[int] | None = None, accepted: torch.Tensor | None = None,
    ) -> None:
        self.plan = plan
        self.sampled_seqs = sampled
        """Free rows first, then `late.seqs`."""
        self.sampled_ids = sampled_ids
        """[R] int64 on the device (the late rows' entries are written by `sample_late`)."""
        self.first_rows = first_rows if first_rows is not None else list(range(len(sampled)))
        """Each sampled sequence's first row in `sampled_ids`."""
        self.accepted = accepted
        """[len(sampled)] int64 on the device: draft tokens accepted (None: the step verified no draft)."""
        self.scored_seqs = scored
        self.completed_seqs = completed
        """Sequences that sample nothing (scoring, prefill-only) whose last token this step computes."""
        self.late = late
        self.preemptions_at_launch = {seq.seq_id: seq.num_preemptions for seq in sampled + scored + completed}
        """Results of a sequence preempted after the launch are dropped (its recompute runs again); the
        tokens it sampled stay valid."""
        self._scores = scores
        self._host_ids: torch.Tensor | None = None
        self._host_accepted: torch.Tensor | None = None
        self._logprobs: list[LogprobRows] = []
        self._event: torch.cuda.Event | None = None
        self._sealed = False
        self._discarded = False

    def add_logprobs(self, rows: LogprobRows | None) -> None:
        """Carry these rows' log-probabilities to the host with the ids (before `seal`)."""
        assert not self._sealed, "log-probabilities added after the copies started"
        if rows is not None:
            self._logprobs.append(rows)

    def seal(self) -> None:
        """Every result is queued on the device: start copying them to the host."""
        self._sealed = True
        device = next((t.device for t in (self.sampled_ids, self._scores) if t is not None), None)
        self._host_ids = _to_host(self.sampled_ids)
        self._host_accepted = _to_host(self.accepted)
        self._scores = _to_host(self._scores)
        self._logprobs = [
            r._replace(chosen=_host(r.chosen), top_values=_host(r.top_values), top_ids=_host(r.top_ids))
            for r in self._logprobs
        ]
        if device is not None and device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def discard(self) -> None:
        """The step's requests were failed before it was collected: `wait` returns nothing. Waits for
        the device once, so buffers the failed step still reads are not reused under it (error path)."""
        self._discarded = True
        if self.sampled_ids is not None and self.sampled_ids.device.type == "cuda":
            torch.cuda.current_stream(self.sampled_ids.device).synchronize()

    def wait(self) -> StepOutput:
        """Block until the step's results are on the host."""
        if self._discarded:
            return StepOutput()
        assert self._sealed, "a step with late rows is collected before they were sampled"
        if self._event is not None:
            self._event.synchronize()
        ids = self._host_ids.tolist() if self._host_ids is not None else []
        row_logprobs: list[TokenLogprob | None] = [None] * len(ids)
        for rows in self._logprobs:
            for row, entry in enumerate(rows.entries(ids)):
                if entry is not None:
                    row_logprobs[row] = entry
        accepted = self._host_accepted.tolist() if self._host_accepted is not None else [0] * len(self.sampled_seqs)
        output = StepOutput(accepted=accepted)
        for seq, first, num_accepted in zip(self.sampled_seqs, self.first_rows, accepted):
            end = first + num_accepted + 1
            output.sampled.append((seq, ids[first:end]))
            output.logprobs.append(row_logprobs[first:end])
        scores = self._scores.tolist() if self._scores is not None else []
        output.scores = list(zip(self.scored_seqs, scores))
        return output
