"""Host side of speculative decoding, pure Python: the n-gram drafter, the acceptance control, the
settings, the speculator's bookkeeping of steps in flight, and the KV policies' span and rollback."""

from __future__ import annotations

import pytest

from terse.backend.local.config import EngineConfig
from terse.backend.local.kv_manager import KVManager
from terse.backend.local.kv_policy import DENSE, UNBOUNDED_SPAN, SeqKV
from terse.backend.local.prompt_lookup import PromptLookup
from terse.backend.local.scheduler import ScheduledChunk, Scheduler, StepPlan
from terse.backend.local.sequence import PENDING_TOKEN, Draft, Sequence, SequenceStatus
from terse.backend.local.speculative import AcceptanceControl, SpeculativeSettings, Speculator, _InFlight
from terse.backend.local.streaming import StreamingKVPolicy
from terse.backend.types import SamplingParams
from terse.errors import ConfigError


def test_lookup_takes_the_longest_suffix_at_its_latest_occurrence() -> None:
    #          0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 1, 2]
    drafter = PromptLookup(tokens, 1, 3)
    # suffix (1, 2) -> its earlier end 1 -> 3 9 9 5 ...; (2,) alone would take the latest 2 (index 6) -> 3 7 8
    assert drafter.propose(tokens, len(tokens), (), 4) == [3, 9, 9, 5]
    assert drafter.propose(tokens, len(tokens), (3,), 3) == [9, 9, 5]  # suffix (1, 2, 3), with the assumed tail
    assert drafter.propose(tokens, len(tokens), (), 0) == []
    assert PromptLookup([4, 5, 6], 1, 3).propose([4, 5, 6], 3, (), 4) == []  # nothing repeats: no draft
    # the continuation runs into the assumed tail and stops at the history's end
    assert drafter.propose(tokens, len(tokens), (3, 9), 5) == [9, 5, 2, 3, 7]


def test_lookup_indexes_resolved_tokens_as_they_come_never_the_suffix_itself() -> None:
    tokens = [7, 8, 9, PENDING_TOKEN]
    drafter = PromptLookup(tokens[:3], 2, 2)
    assert drafter.propose(tokens, 3, (), 4) == []  # (8, 9) occurs once: its own suffix
    tokens = [7, 8, 9, 7, 8, PENDING_TOKEN]
    drafter.update(tokens, 5)
    assert drafter.propose(tokens, 5, (), 4) == [9, 7, 8]
    tokens[5] = 9
    drafter.update(tokens, 6)
    assert drafter.propose(tokens, 6, (), 2) == [7, 8]  # (8, 9) now ends at 5 too, but without a continuation


def test_acceptance_control_backs_off_then_waits_for_a_shadow_draft_and_doubles_on_repeated_failures() -> None:
    control = AcceptanceControl(SpeculativeSettings(min_acceptance=0.5, ema_weight=1.0, backoff_steps=2, max_backoff_steps=4))
    assert control.allows()
    control.update(4, 4)
    assert control.allows()
    control.update(4, 1)  # 0.25 < 0.5: two idle steps, then on probation until a shadow draft passes
    assert [control.allows() for _ in range(4)] == [False] * 4 and control.shadow_due
    assert not control.update_shadow(4, 1)  # a failing shadow draft: still on probation, no further wait
    assert control.shadow_due and control.num_idle_steps == 0
    assert control.update_shadow(4, 3) and control.allows()  # a passing one: drafting resumes
    control.update(4, 0)  # a verified step fails again: the back-off doubled
    assert control.num_idle_steps == 4 and control.probation
    assert control.update_shadow(4, 4) and control.num_idle_steps == 4  # the wait still runs out first
    assert [control.allows() for _ in range(5)] == [False] * 4 + [True]
    control.update(4, 0)
    assert control.num_idle_steps == 4  # capped at max_backoff_steps
    control.update_shadow(4, 4)
    control.update(4, 3)  # a good verified step shortens the next wait by a quarter
    assert control.backoff == 3


def test_held_drafting_backs_off_when_accepted_tokens_do_not_repay_the_held_step() -> None:
    """Half of a 2-token draft accepted passes the rate test (0.5 >= 0.3) but yields 2 tokens in the two
    steps a held drafter spends: held drafting backs off; drafting ahead (no held step) does not."""
    held = AcceptanceControl(SpeculativeSettings(ema_weight=1.0, backoff_steps=2))
    ahead = AcceptanceControl(SpeculativeSettings(ema_weight=1.0, backoff_steps=2, draft_ahead=True))
    for control in (held, ahead):
        control.update(2, 1)
    assert held.probation and held.num_idle_steps == 2
    assert ahead.allows() and not ahead.probation
    assert not held.update_shadow(2, 1)  # a shadow draft is judged by the same floors
    assert held.update_shadow(4, 2)  # two accepted tokens would repay the held step: drafting resumes
    held.update(4, 1)  # one alone does not (acceptance 0.25 < 0.3 as well): the doubled wait
    assert held.num_idle_steps == 4 and held.backoff == 8
    off = AcceptanceControl(SpeculativeSettings(ema_weight=1.0, min_acceptance=0.0, min_accepted_tokens=0.0))
    off.update(4, 0)
    assert off.allows()  # both floors at 0: never backs off
    with pytest.raises(ConfigError, match=r"min_accepted_tokens=5 must be a number in \[0, 4\]"):
        SpeculativeSettings(min_accepted_tokens=5)


def test_held_drafting_does_not_draft_a_single_token() -> None:
    """A one-token draft can accept at most one token, below `min_accepted_tokens`: held drafting
    decodes instead; drafting ahead, or a floor below 1, drafts it."""
    prompt = [1, 2, 3, 4, 9, 8, 1, 2]  # "1 2" -> 3 4 ...; the draft is cut to what max_tokens leaves
    for settings, expected in [
        (SpeculativeSettings(), None),
        (SpeculativeSettings(min_accepted_tokens=0.5), (3,)),
        (SpeculativeSettings(draft_ahead=True), (3,)),
    ]:
        kv = KVManager(64, 4)
        spec = Speculator(settings, kv)
        seq = Sequence(0, prompt, SamplingParams(max_tokens=2), max_len=256)
        assert kv.allocate(seq, len(prompt))
        seq.num_computed_tokens = len(prompt) - 1
        seq.status = SequenceStatus.RUNNING
        spec.attach(seq)
        spec.propose([seq])
        assert (seq.draft.tokens if seq.draft is not None else None) == expected, settings
        assert seq.spec.drafting == (expected is not None)
    long_enough = Sequence(1, prompt, SamplingParams(max_tokens=8), max_len=256)
    kv = KVManager(64, 4)
    spec = Speculator(SpeculativeSettings(), kv)
    assert kv.allocate(long_enough, len(prompt))
    long_enough.num_computed_tokens = len(prompt) - 1
    long_enough.status = SequenceStatus.RUNNING
    spec.attach(long_enough)
    spec.propose([long_enough])
    assert long_enough.draft is not None and long_enough.draft.tokens == (3, 4, 9, 8)


def test_a_flapping_drafter_keeps_a_long_back_off() -> None:
    """Verified steps that pass and fail by turns do not reset the wait to its minimum each time (a
    shadow draft ends each probation)."""
    control = AcceptanceControl(SpeculativeSettings(min_acceptance=0.5, ema_weight=1.0, backoff_steps=2,
                                                    max_backoff_steps=64))
    waits = []
    for _ in range(6):
        control.update(4, 0)  # fails: waits, the next wait doubles
        waits.append(control.num_idle_steps)
        while control.allows() is False and not control.shadow_due:
            pass
        assert control.update_shadow(4, 4)
        control.update(4, 4)  # the next verified step passes: the next wait shrinks by a quarter
    assert waits == [2, 3, 4, 6, 9, 13]
    for _ in range(10):
        control.update(4, 4)  # good steps in a row bring it back to the minimum
    assert control.backoff == 2


def test_settings_validate_and_come_from_plain_options() -> None:
    assert EngineConfig.from_options({"speculative": "prompt_lookup"}).speculative == SpeculativeSettings()
    assert EngineConfig.from_options({"speculative": True}).speculative == SpeculativeSettings()
    assert EngineConfig.from_options({"speculative": False}).speculative is None
    table = {"num_draft_tokens": 6, "min_ngram": 2, "max_ngram": 4}
    assert EngineConfig.from_options({"speculative": table}).speculative == SpeculativeSettings(**table)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"speculative.method='medusa' must be one of 'prompt_lookup'"):
        EngineConfig.from_options({"speculative": "medusa"})
    with pytest.raises(ConfigError, match=r"unknown speculative fields \['k'\]"):
        EngineConfig.from_options({"speculative": {"k": 3}})
    with pytest.raises(ConfigError, match=r"speculative.num_draft_tokens=0 must be an int >= 1"):
        SpeculativeSettings(num_draft_tokens=0)
    with pytest.raises(ConfigError, match=r"min_ngram=3 exceeds max_ngram=2"):
        SpeculativeSettings(min_ngram=3, max_ngram=2)
    with pytest.raises(ConfigError, match=r"min_acceptance=1.5 must be a number in \[0, 1\]"):
        SpeculativeSettings(min_acceptance=1.5)
    with pytest.raises(ConfigError, match=r"speculative.num_draft_tokens=True must be an int >= 1"):
        SpeculativeSettings(num_draft_tokens=True)
    with pytest.raises(ConfigError, match=r"speculative.ema_weight=0 must be a number in \(0, 1\]"):
        SpeculativeSettings(ema_weight=0)
    with pytest.raises(ConfigError, match=r"max_backoff_steps=4 is below backoff_steps=8"):
        SpeculativeSettings(max_backoff_steps=4)
    with pytest.raises(ConfigError, match=r"speculative='yes please' must be a SpeculativeSettings"):
        EngineConfig(speculative="yes please")  # type: ignore[arg-type]


def _decoding(kv: KVManager, prompt: list[int], max_tokens: int = 32) -> Sequence:
    seq = Sequence(0, prompt, SamplingParams(max_tokens=max_tokens), max_len=256)
    assert kv.allocate(seq, len(prompt))
    seq.num_computed_tokens = len(prompt) - 1  # as after a prefill whose last token was computed last
    return seq


def test_speculator_builds_on_the_step_in_flight_and_learns_its_gate() -> None:
    kv = KVManager(64, 4)
    spec = Speculator(SpeculativeSettings(num_draft_tokens=3, draft_ahead=True), kv)
    prompt = [1, 2, 3, 4, 5, 6, 1, 2]
    seq = _decoding(kv, prompt)
    spec.attach(seq)
    spec.propose([seq])  # nothing in flight: the draft follows the known last token
    assert seq.draft == Draft((3, 4, 5))
    plan = StepPlan(decodes=[ScheduledChunk(seq, 4, kv.table(seq), seq.draft)])
    seq.num_computed_tokens += 1
    seq.append_pending()
    spec.on_launched(plan, [seq])
    assert seq.num_speculative_tokens == 3 and seq.draft is None
    spec.propose([seq])  # assumes 3 4 5 accepted: "... 1 2 3 4 5" continues with 6 (the guess) 1 2 3
    assert seq.draft == Draft((1, 2, 3), guess=6, assumed_accepted=3)
    plan = StepPlan(decodes=[ScheduledChunk(seq, 4, kv.table(seq), seq.draft)])
    seq.num_computed_tokens += 1
    seq.append_pending()
    spec.on_launched(plan, [seq])
    spec.on_collected(seq, [3, 9], 1)  # the first step accepted one draft token and then yielded 9
    assert (seq.num_draft_tokens, seq.num_accepted_tokens) == (3, 1)
    assert seq.num_speculative_tokens == 0  # so the second step's gate fails: its draft cannot count
    assert spec.num_voided_drafts == 1
    spec.on_collected(seq, [7], 0)
    assert seq.num_speculative_tokens == 0 and spec.num_draft_tokens == 6 and spec.num_accepted_tokens == 1


def test_drafts_respect_max_tokens_and_constrained_sequences_never_draft() -> None:
    kv = KVManager(64, 4)
    spec = Speculator(SpeculativeSettings(num_draft_tokens=8), kv)
    seq = _decoding(kv, [1, 2, 3, 4, 5, 1, 2], max_tokens=3)
    spec.attach(seq)
    spec.propose([seq])
    assert seq.draft == Draft((3, 4))  # 1 + 2 tokens reach max_tokens=3
    other = Sequence(1, [1, 2, 1], SamplingParams(max_tokens=8), 256, constraint=object())
    spec.attach(other)
    assert other.spec is None


@pytest.mark.parametrize(("sinks", "window"), [(4, 8), (0, 8), (5, 13), (16, 16)])
def test_streaming_span_ends_where_one_token_steps_release_the_next_block(sinks: int, window: int) -> None:
    policy, bs = StreamingKVPolicy(sinks, window), 4
    for dropped in (0, 8, 16):
        kv = SeqKV(policy, list(range(20)), num_dropped_tokens=dropped)
        for first in range(dropped + sinks, 80):
            base = policy.num_releasable_blocks(kv, first, bs)
            span = policy.max_span(kv, first, bs)
            assert span >= 1
            assert all(policy.num_releasable_blocks(kv, first + i, bs) == base for i in range(span))
            assert policy.num_releasable_blocks(kv, first + span, bs) > base
    assert DENSE.max_span(SeqKV(DENSE, [1]), 5, bs) == UNBOUNDED_SPAN


def test_rollback_frees_only_blocks_past_the_kept_positions() -> None:
    kv = KVManager(16, 4)
    seq = _decoding(kv, list(range(10)))
    assert kv.allocate(seq, 1 + 6)  # positions up to 15: blocks for 16 tokens
    assert len(kv.table(seq).block_ids) == 4 and kv.num_free_blocks == 12
    kv.rollback(seq, 11)  # positions 0..10 stay: 3 blocks
    assert kv.table(seq).block_ids == [0, 1, 2] and kv.num_free_blocks == 13
    kv.rollback(seq, 12)  # nothing past them to free
    assert kv.table(seq).block_ids == [0, 1, 2]
    streaming = StreamingKVPolicy(4, 8)
    table = SeqKV(streaming, [20, 5, 6, 7, 8], num_dropped_tokens=8)  # sink copy + window
    assert streaming.truncate(table, 17, 4) == [7, 8] and table.block_ids == [20, 5, 6]
    assert streaming.truncate(table, 0, 4) == [5, 6] and table.block_ids == [20]  # sinks always stay


def test_prompt_lookup_matches_a_brute_force_search() -> None:
    import random

    from terse.backend.local.prompt_lookup import PromptLookup

    def brute(tokens: list[int], resolved: int, tail: list[int], k: int, lo: int, hi: int) -> list[int]:
        history = tokens[:resolved] + tail
        for n in range(min(hi, len(history)), lo - 1, -1):
            for end in range(resolved - 2, n - 2, -1):  # latest first, a resolved continuation after it
                if history[end - n + 1 : end + 1] == history[-n:]:
                    return history[end + 1 : min(end + 1 + k, len(history))]
        return []

    rng = random.Random(0)
    for case in range(1000):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 60))]
        resolved = rng.randrange(0, len(tokens) + 1)
        lo = rng.randrange(1, 3)
        hi = rng.randrange(lo, 5)
        lookup = PromptLookup(tokens[: resolved // 2], lo, hi)
        lookup.update(tokens, resolved)  # grown in two calls, as the engine does
        tail = [rng.randrange(6) for _ in range(rng.randrange(0, 3))]
        k = rng.randrange(1, 5)
        assert lookup.propose(tokens, resolved, tail, k) == brute(tokens, resolved, tail, k, lo, hi), case


def _running(kv: KVManager, scheduler: Scheduler, spec: Speculator, seq_id: int, prompt: list[int]) -> Sequence:
    seq = Sequence(seq_id, prompt, SamplingParams(max_tokens=32), max_len=256)
    assert kv.allocate(seq, len(prompt))
    seq.num_computed_tokens = len(prompt) - 1
    seq.status = SequenceStatus.RUNNING
    scheduler.running.append(seq)
    spec.attach(seq)
    return seq


def _launch(spec: Speculator, scheduler: Scheduler) -> list[int]:
    """Propose, schedule and launch one step as the engine does; the ids of the sequences decoding in it."""
    spec.propose(scheduler.running)
    plan = scheduler.schedule()
    scheduler.on_step_launched(plan)
    sampled = [c.seq for c in plan.decodes]
    for seq in sampled:
        seq.append_pending()
    spec.on_launched(plan, sampled)
    return sorted(seq.seq_id for seq in sampled)


def _collect(spec: Speculator, seq: Sequence, tokens: list[int], num_accepted: int = 0) -> None:
    spec.on_collected(seq, tokens, num_accepted)
    seq.num_computed_tokens += num_accepted
    seq.resolve_pending(tokens[0])
    for token in tokens[1:]:
        seq.insert_resolved(token)


def test_held_drafting_holds_only_sequences_whose_next_step_drafts() -> None:
    kv = KVManager(64, 4)
    settings = SpeculativeSettings(num_draft_tokens=3, min_acceptance=0.5, ema_weight=1.0, backoff_steps=2)
    spec = Speculator(settings, kv)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, hold_drafting=True)
    a = _running(kv, scheduler, spec, 0, [1, 2, 3, 4, 5, 6, 1, 2])  # "1 2" repeats: drafts 3 4 5
    b = _running(kv, scheduler, spec, 1, [10, 11, 12, 13])  # nothing repeats: no draft
    assert _launch(spec, scheduler) == [0, 1]  # step 1, every token known: both propose
    assert a.spec.drafting and not b.spec.drafting and a.num_speculative_tokens == 3
    # step 2, step 1 in flight: the drafting one waits, the other decodes without a draft
    assert _launch(spec, scheduler) == [1] and b.draft is None
    _collect(spec, a, [9])  # step 1 rejected a's whole draft: acceptance 0 < 0.5, two steps of back-off
    _collect(spec, b, [14])
    assert a.spec.control.num_idle_steps == 2
    # step 3: a backs off and is not held (each of its decode steps counts one), b still finds nothing
    assert _launch(spec, scheduler) == [0, 1] and a.spec.control.num_idle_steps == 1
    _collect(spec, b, [15])
    assert _launch(spec, scheduler) == [0, 1] and a.spec.control.num_idle_steps == 0  # step 4: a's token in flight
    _collect(spec, a, [1])
    _collect(spec, b, [11])  # b's known tokens now end in 11, which occurred before: a match appears
    # step 5: a's back-off is over and it is on probation: not held; from its known tokens "... 9 1" it
    # proposes a shadow draft 2 9 1 (never verified). b: held, its next step drafts
    assert _launch(spec, scheduler) == [0]
    assert not a.spec.drafting and a.spec.shadow == (10, (2, 9, 1)) and b.spec.drafting
    for step, token in enumerate([2, 9], start=6):  # the output follows the shadow draft: a keeps decoding
        _collect(spec, a, [token])
        assert _launch(spec, scheduler) == [0], step
        assert not a.spec.drafting and a.spec.control.probation
    _collect(spec, a, [1])  # the whole shadow draft came true: probation over, a is held to draft again
    assert _launch(spec, scheduler) == [] and a.spec.drafting and not a.spec.control.probation
    assert a.spec.shadow is None and spec.num_shadow_drafts == 1
    assert spec.num_voided_drafts == 0


def test_held_drafting_never_drafts_on_a_guess() -> None:
    kv = KVManager(64, 4)
    spec = Speculator(SpeculativeSettings(num_draft_tokens=3), kv)
    scheduler = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64, hold_drafting=True)
    seq = _running(kv, scheduler, spec, 0, [5, 6, 7, 8])
    _launch(spec, scheduler)
    assert not seq.spec.drafting
    _collect(spec, seq, [5])  # known: "5 6 7 8 5": the lookup matches 5 -> 6 7 8
    seq.append_pending()  # as if a later step were in flight (its token unknown)
    seq.num_computed_tokens += 1
    seq.spec.in_flight.append(_InFlight(None))
    spec.propose([seq])
    assert seq.draft is None and seq.spec.drafting  # no guess: it waits and drafts from known tokens
