"""Speculative decoding on the host: settings, per-sequence drafting and the acceptance control.

A `Speculator` proposes, before each step is scheduled, a draft for every decoding sequence that has
one (prompt_lookup.py); the scheduler gives a drafted sequence 1 + len(draft) rows; the runner verifies
them in one forward pass (verify.py) and returns the accepted tokens plus one more; the KV manager rolls
the rejected positions back. Nothing waits for the device: the engine keeps launching step N+1 before
step N's tokens reach the host (engine.py), so a draft for step N+1 is built on what the host assumes
step N (still running) produces:

    host knows:   ... t  (resolved)            step N in flight: input t, draft d1 d2 d3 -> yields ? (1-4 tokens)
    draft N+1:    assume N accepts d1 d2 d3; look up the continuation of "... t d1 d2 d3":
                  c0 c1 c2 ...  where c0 guesses N's last token (its bonus token)
    step N+1:     input = N's last token, taken on the device; rows [x, c1, c2, ...] at positions shifted on
                  the device by N's accepted count; the drafts count only if N accepted d1 d2 d3 and x == c0
                  (the "gate", checked on the device); otherwise row 0 still yields one exact token

Once step N is collected the host knows whether step N+1's gate can pass; a draft for step N+2 then
assumes N+1's draft only when it can. Positions of step N+1 lie between its host lower bound
(`num_computed_tokens`) and that plus `num_speculative_tokens` (N's draft, if it may be accepted): the KV
manager allocates for the far end and the runner shifts the positions on the device.

Adaptive control: per sequence, exponential moving averages of accepted / proposed draft tokens and of
accepted tokens per verified step. When the first falls below `min_acceptance`, or (held drafting) the
second below `min_accepted_tokens`, the sequence stops drafting for `backoff_steps` decode steps (doubling
on each failed verified step up to `max_backoff_steps`, shrinking by a quarter with each good one) and is
then on probation: it proposes shadow drafts from its known tokens, never verified and never held for,
and judges each by the tokens it then produces (the leading tokens that match are what verifying it
would have accepted; a mismatch settles it at once). Shadow drafts feed the same moving averages, started
from zero when the probation begins, and the probation ends once both are back above their floors (at
the defaults, two wholly right 4-token shadow drafts in a row): then the sequence drafts again. Probing
with a verified draft would cost a held step and the verify rows each time; a shadow draft costs one
lookup on the host. A sequence without a match decodes normally at no cost. Constrained (structured-output) sequences never draft: their masks need
the grammar advanced token by token on the host (they keep the late sampling of runner.py).

Held drafting (`draft_ahead` False, the default) drafts from known tokens only: the scheduler holds a
sequence while its last token is on the device, but only a sequence that drafts in its next step
(`SpecState.drafting`). Each decode step of a sequence is one of

    last token known:      propose from known tokens (back-off counted); drafting = a draft came out
    in flight, drafting:   held this step (not a decode step: nothing counted); next step it proposes
    in flight, otherwise:  decodes one token without a draft, in step with the loop's overlap; backing
                           off, the step is counted; on probation, its shadow draft is judged (one
                           that passes sets drafting); else the drafter looks up the known tokens (the
                           lookup the next proposal would make, one token earlier) and a match sets
                           drafting, holding it from this step on

A new sequence starts as drafting (its first decode step waits for the prefill's token and proposes from
it: short answers copied from the prompt are drafted from their first token on). From then on a sequence
that finds no match, or is backing off or on probation, decodes every step like one without
speculation, and starts drafting again as soon as its known tokens match again or a shadow draft passes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from terse.backend.local.prompt_lookup import DRAFTERS, Drafter
from terse.backend.local.sequence import Draft, Sequence
from terse.validation import check_choice, check_int, check_range, require

if TYPE_CHECKING:
    from terse.backend.local.kv_manager import KVManager
    from terse.backend.local.scheduler import StepPlan

SpeculativeMethod = Literal["prompt_lookup"]


@dataclass(frozen=True)
class SpeculativeSettings:
    """Speculative decoding of the local engine. Frozen; a bad value raises `ConfigError` naming the fix."""

    method: SpeculativeMethod = "prompt_lookup"
    """How drafts are made: "prompt_lookup" copies what followed the latest earlier occurrence of the last
    n tokens in the prompt or the output (no draft model)."""
    num_draft_tokens: int = 4
    """Most draft tokens verified per sequence and step (k): a verified step yields up to k + 1 tokens."""
    max_ngram: int = 3
    """Longest suffix matched (tried first)."""
    min_ngram: int = 1
    """Shortest suffix matched."""
    min_acceptance: float = 0.3
    """A sequence whose moving average of accepted / proposed draft tokens falls below this stops drafting
    for a while (0 never stops)."""
    min_accepted_tokens: float = 1.25
    """Held drafting only (`draft_ahead` False): a sequence whose moving average of accepted draft tokens
    per verified step falls below this stops drafting for a while, and a proposal too short to reach it
    even if wholly accepted (at the default, one token) is not drafted. A drafting sequence decodes one
    step in two (it waits for its last token), so a verified step yields accepted + 1 tokens for two
    steps' time where plain decoding yields 2: it pays only when more than one draft token is accepted,
    and the verified rows cost the batch a little more (0 never stops). On one H200 at batch 8 (8B
    shape), drafts with a per-token acceptance of 0.16 passed the rate test often enough to cost 5.3-5.8%
    of throughput; with this floor and shadow drafts on probation, -0.7 to -1.9%."""
    ema_weight: float = 0.3
    """Weight of the latest verified step in the moving averages, in (0, 1]."""
    backoff_steps: int = 8
    """Decode steps a sequence goes without drafting, or judging shadow drafts, after a verified step left
    its moving averages below `min_acceptance` or `min_accepted_tokens`."""
    max_backoff_steps: int = 256
    """The back-off doubles with each failed verified step, up to this, and shrinks by a quarter with each
    good one (down to `backoff_steps`)."""
    max_batch_size: int | None = 8
    """No sequence drafts in a step where more than this many sequences decode (None: no limit). A batch
    already keeps the device busy on its weights: the rows a verify step adds cost more there than they
    save, every probe of a failing drafter costs the whole batch, and the host's lookups grow with the
    batch. On one H200 the adaptive control alone lost up to 6.3% of throughput at batch 16, 5.3-5.8% at
    32 and 11-15% at 64 (8B shape, drafts that rarely matched), and 3-26% at batch 16 on the reference
    model's doc-QA answers (a host-bound loop); at batch 1 speculation decodes doc-QA answers 1.5-1.8x
    faster."""
    draft_ahead: bool = False
    """True: a drafting sequence is scheduled while its last token is still on the device, its draft built
    on the assumed outcome of the step in flight (host work overlaps the device, but a wrong guess voids
    the draft). False: a sequence that drafts waits for that token to reach the host and drafts from known
    tokens (it decodes one step in two, no draft is voided); a sequence that does not draft (its known
    tokens find no match, or it is backing off) is not held and decodes every step, never on a guess; it
    is held again once a lookup of its known tokens matches (the rule: module docstring). On one H200
    (reference model, doc-QA, batch 1) False decoded 1.70x faster than without speculation and True 1.06x
    (most guessed drafts were voided)."""

    @property
    def accepted_floor(self) -> float:
        """The floor of accepted tokens per verified step in force: `min_accepted_tokens` when drafting
        is held, 0 when drafts are built ahead (no held step to repay)."""
        return 0.0 if self.draft_ahead else self.min_accepted_tokens

    @property
    def min_draft_len(self) -> int:
        """Shortest draft worth verifying: one that could reach `accepted_floor` if wholly accepted."""
        return min(int(self.accepted_floor) + 1, self.num_draft_tokens)

    def __post_init__(self) -> None:
        check_choice("speculative.method", self.method, sorted(DRAFTERS))
        check_int("speculative.num_draft_tokens", self.num_draft_tokens, low=1, example=4)
        check_int("speculative.max_ngram", self.max_ngram, low=1, example=3)
        check_int("speculative.min_ngram", self.min_ngram, low=1, example=1)
        require(
            self.min_ngram <= self.max_ngram,
            f"speculative.min_ngram={self.min_ngram} exceeds max_ngram={self.max_ngram}; use min_ngram <= max_ngram",
        )
        check_range("speculative.min_acceptance", self.min_acceptance, 0, 1, example=0.3)
        check_range("speculative.min_accepted_tokens", self.min_accepted_tokens, 0, self.num_draft_tokens,
                    example=1.25)
        check_range("speculative.ema_weight", self.ema_weight, 0, 1, low_open=True, example=0.3)
        check_int("speculative.backoff_steps", self.backoff_steps, low=1, example=8)
        check_int("speculative.max_backoff_steps", self.max_backoff_steps, low=1, example=256)
        if self.max_batch_size is not None:
            check_int("speculative.max_batch_size", self.max_batch_size, low=1, example=8)
        require(
            self.max_backoff_steps >= self.backoff_steps,
            f"speculative.max_backoff_steps={self.max_backoff_steps} is below backoff_steps={self.backoff_steps}",
        )


class AcceptanceControl:
    """Whether one sequence drafts now: moving averages of its acceptance, an exponential back-off, and a
    probation that shadow drafts end (module docstring)."""

    def __init__(self, settings: SpeculativeSettings) -> None:
        self.settings = settings
        self.acceptance = 1.0
        """Moving average of accepted / proposed (optimistic start: the first drafts are always tried)."""
        self.accepted = float(settings.num_draft_tokens)
        """Moving average of accepted draft tokens per verified step (optimistic start, like `acceptance`)."""
        self.num_idle_steps = 0
        """Decode steps left before shadow drafts are tried."""
        self.backoff = settings.backoff_steps
        self.probation = False
        """After a failed verified step: no drafting until a shadow draft passes."""

    def allows(self) -> bool:
        """Called once per decode step of the sequence: whether it may draft (counts the back-off down)."""
        if self.num_idle_steps > 0:
            self.num_idle_steps -= 1
            return False
        return not self.probation

    @property
    def shadow_due(self) -> bool:
        """On probation with the back-off over: shadow drafts decide when drafting resumes."""
        return self.probation and self.num_idle_steps == 0

    def _passes(self, num_proposed: int, num_accepted: int) -> bool:
        s = self.settings
        self.acceptance += s.ema_weight * (num_accepted / num_proposed - self.acceptance)
        self.accepted += s.ema_weight * (num_accepted - self.accepted)
        return self.acceptance >= s.min_acceptance and self.accepted >= s.accepted_floor

    def update(self, num_proposed: int, num_accepted: int) -> None:
        """A verified step's result."""
        s = self.settings
        if self._passes(num_proposed, num_accepted):
            # a good step shortens the next wait by a quarter (a failure doubles it): a drafter whose
            # verified steps pass and fail by turns waits longer each time, one that stays good is back
            # at `backoff_steps` within a dozen steps
            self.backoff = max(s.backoff_steps, self.backoff * 3 // 4)
            self.probation = False
            return
        self.num_idle_steps = self.backoff
        self.backoff = min(2 * self.backoff, s.max_backoff_steps)
        self.probation = True
        # shadow drafts start from nothing: a lucky one alone does not end the probation (at the default
        # floors it takes two wholly right 4-token shadow drafts in a row)
        self.acceptance = self.accepted = 0.0

    def update_shadow(self, num_proposed: int, num_accepted: int) -> bool:
        """A shadow draft's result (what verifying it would have accepted); True ends the probation."""
        if self._passes(num_proposed, num_accepted):
            self.probation = False
        return not self.probation


@dataclass(eq=False)
class _InFlight:
    """One launched step of a sequence, until the engine collects it."""

    draft: Draft | None
    possible: bool = True
    """Whether its draft can still be accepted (False once the step before it showed its gate fails)."""


@dataclass(eq=False)
class SpecState:
    """The speculator's per-sequence state (`Sequence.spec`)."""

    drafter: Drafter
    control: AcceptanceControl
    in_flight: deque[_InFlight] = field(default_factory=deque)
    drafting: bool = True
    """Held drafting: its next decode step drafts from known tokens, so the scheduler holds it while its
    last token is on the device (`Scheduler.hold_drafting`). Set by each proposal (module docstring);
    True at first, so that the first decode step drafts from the prefill's token."""
    num_looked_up: int = 0
    """Resolved tokens that the latest lookup from known tokens saw (one of the same tokens is not repeated)."""
    shadow: tuple[int, tuple[int, ...]] | None = None
    """On probation: a draft proposed from known tokens but not verified, (index of its first token in
    `token_ids`, its tokens), compared with the tokens the sequence then produces."""


class Speculator:
    """Drafts for the engine loop and keeps the books of what was proposed and accepted."""

    def __init__(self, settings: SpeculativeSettings, kv: KVManager) -> None:
        self.settings = settings
        self.kv = kv
        self.num_draft_tokens = 0
        """Draft tokens verified (engine-wide)."""
        self.num_accepted_tokens = 0
        """Of those, accepted."""
        self.num_verify_steps = 0
        """Sequence-steps that verified a draft."""
        self.num_voided_drafts = 0
        """Of those, drafts built on a wrong guess of the step before (rejected whole by the gate)."""
        self.num_capped_steps = 0
        """Steps in which nothing drafted because more than `max_batch_size` sequences decoded."""
        self.num_shadow_drafts = 0
        """Shadow drafts judged (sequences on probation; never verified)."""
        self.min_draft_len = settings.min_draft_len

    def attach(self, seq: Sequence) -> None:
        """Give a new generating sequence its drafter (indexes the prompt: call on the submitting thread)."""
        if seq.samples and seq.constraint is None:
            drafter = DRAFTERS[self.settings.method](seq.token_ids, self.settings.min_ngram, self.settings.max_ngram)
            seq.spec = SpecState(drafter, AcceptanceControl(self.settings))

    def propose(self, seqs: Iterable[Sequence]) -> None:
        """Set `seq.draft` for each sequence about to decode (None where it does not draft). Nothing
        drafts, and no one is held for a draft, while more than `max_batch_size` sequences decode."""
        seqs = list(seqs)
        cap = self.settings.max_batch_size
        if cap is not None and sum(not seq.is_prefilling for seq in seqs) > cap:
            for seq in seqs:
                seq.draft = None
                if seq.spec is not None:
                    seq.spec.drafting = False
            self.num_capped_steps += 1
            return
        for seq in seqs:
            seq.draft = self._propose(seq) if seq.spec is not None and seq.num_uncomputed_tokens == 1 else None

    def _propose(self, seq: Sequence) -> Draft | None:
        state: SpecState = seq.spec
        if len(state.in_flight) > 1:
            return None
        if state.in_flight and not self.settings.draft_ahead:
            self._probe(seq, state)
            return None
        if not state.control.allows():
            state.drafting = False
            if not (state.control.shadow_due and self._shadow(seq, state)):
                return None
        draft = self._draft(seq, state)
        state.drafting = draft is not None
        return draft

    def _probe(self, seq: Sequence, state: SpecState) -> None:
        """Held drafting, the last token on the device: no draft this step (module docstring). A
        drafting sequence is held; any other decodes, and turns drafting when its known tokens match."""
        if state.drafting:
            return  # held (not a decode step)
        if not state.control.allows():  # backing off (this decode step counted) or on probation
            if state.control.shadow_due and self._shadow(seq, state):
                state.drafting = True  # a shadow draft passed: held from this step on
            return
        num_resolved = seq.num_tokens - seq.num_pending_tokens
        if num_resolved == state.num_looked_up:
            return  # the proposal that found nothing saw these very tokens
        state.num_looked_up = num_resolved
        state.drafter.update(seq.token_ids, num_resolved)
        need = self.min_draft_len
        if self._limit(seq, 0) >= need and len(state.drafter.propose(seq.token_ids, num_resolved, (), need)) >= need:
            state.drafting = True  # held from this step on: its next step drafts from known tokens

    def _shadow(self, seq: Sequence, state: SpecState) -> bool:
        """On probation: judge the pending shadow draft by the tokens resolved since (a mismatch, or every
        position resolved, settles it: the count of leading tokens that matched is what verifying it
        would have accepted), then propose the next one from known tokens. No step is held and no row
        verified for it. True: a shadow draft passed and the probation is over."""
        num_resolved = seq.num_tokens - seq.num_pending_tokens
        if state.shadow is not None:
            start, tokens = state.shadow
            known = seq.token_ids[start:min(num_resolved, start + len(tokens))]
            matched = next((i for i, (a, b) in enumerate(zip(known, tokens)) if a != b), len(known))
            if matched == len(known) and len(known) < len(tokens):
                return False  # all resolved tokens match so far: wait for the rest
            state.shadow = None
            self.num_shadow_drafts += 1
            if state.control.update_shadow(len(tokens), matched):
                return True
        limit = min(self.settings.num_draft_tokens, seq.params.max_tokens - seq.num_output_tokens - 1)
        if limit >= self.min_draft_len:
            state.drafter.update(seq.token_ids, num_resolved)
            proposal = state.drafter.propose(seq.token_ids, num_resolved, (), limit)
            if len(proposal) >= self.min_draft_len:
                state.shadow = (num_resolved, tuple(proposal))
        return False

    def _limit(self, seq: Sequence, num_assumed: int) -> int:
        """Most draft tokens the sequence's next step may verify, `num_assumed` tokens assumed accepted."""
        return min(
            self.settings.num_draft_tokens,
            seq.params.max_tokens - (seq.num_output_tokens + num_assumed) - 1,
            seq.max_len - (seq.num_tokens + num_assumed) - 1,
            self.kv.speculation_span(seq) - 2 - seq.num_speculative_tokens,
        )

    def _draft(self, seq: Sequence, state: SpecState) -> Draft | None:
        num_resolved = seq.num_tokens - seq.num_pending_tokens
        state.drafter.update(seq.token_ids, num_resolved)
        tail: tuple[int, ...] = ()
        if state.in_flight:  # draft ahead, its last token still on the device: the draft starts with a guess of it
            step = state.in_flight[0]
            tail = step.draft.tokens if step.draft is not None and step.possible else ()
        num_assumed = len(tail)  # equals seq.num_speculative_tokens
        limit = self._limit(seq, num_assumed)
        if limit < self.min_draft_len:
            return None
        guessing = bool(state.in_flight)
        if not guessing:
            state.num_looked_up = num_resolved
        tokens = state.drafter.propose(seq.token_ids, num_resolved, tail, limit + guessing)
        if len(tokens) < self.min_draft_len + guessing:
            return None
        if guessing:
            return Draft(tuple(tokens[1:]), tokens[0], num_assumed)
        return Draft(tuple(tokens))

    def on_launched(self, plan: StepPlan, sampled: list[Sequence]) -> None:
        """A step was launched: remember each sampled sequence's draft until the step is collected."""
        drafts = {c.seq.seq_id: c.draft for c in plan.decodes}
        for seq in sampled:
            if seq.spec is None:
                continue
            draft = drafts.get(seq.seq_id)
            seq.spec.in_flight.append(_InFlight(draft))
            seq.num_speculative_tokens = len(draft.tokens) if draft is not None else 0
            if draft is not None:
                self.num_verify_steps += 1
        for chunk in plan.decodes:
            chunk.seq.draft = None

    def on_collected(self, seq: Sequence, tokens: list[int], num_accepted: int) -> None:
        """The oldest launched step of `seq` yielded `tokens` (its accepted draft tokens + one)."""
        state: SpecState | None = seq.spec
        if state is None or not state.in_flight:
            return
        step = state.in_flight.popleft()
        if step.draft is not None:
            num_proposed = len(step.draft.tokens)
            self.num_draft_tokens += num_proposed
            self.num_accepted_tokens += num_accepted
            seq.num_draft_tokens += num_proposed
            seq.num_accepted_tokens += num_accepted
            state.control.update(num_proposed, num_accepted)
        seq.num_speculative_tokens = 0
        if state.in_flight:  # the next step's gate is decided now (the device decides the same)
            after = state.in_flight[0]
            if after.draft is not None and after.draft.guess is not None:
                after.possible = num_accepted == after.draft.assumed_accepted and tokens[-1] == after.draft.guess
                self.num_voided_drafts += not after.possible
            if after.draft is not None and after.possible:
                seq.num_speculative_tokens = len(after.draft.tokens)
