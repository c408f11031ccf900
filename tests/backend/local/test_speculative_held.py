"""Held drafting (`SpeculativeSettings.draft_ahead` False) holds only sequences that draft next: one
whose drafter finds nothing, or that backs off after failed drafts, decodes every step as without
speculation; one whose matches come back drafts again; a batch mixing them stays token-identical.

The drafts come from a scripted drafter: per prompt, nothing, the model's own greedy continuation
(taken from a plain run), tokens it never outputs, or nothing first and the right tokens later."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from terse.backend.local.engine import LocalEngine
from terse.backend.local.models.loader import read_model_config
from terse.backend.local.prompt_lookup import DRAFTERS, PromptLookup
from terse.backend.local.scheduler import StepPlan
from terse.backend.local.sequence import SequenceStatus
from terse.backend.types import SamplingParams
from tests.backend.local.spec_helpers import assert_no_leak, engine

NEW = 40
GREEDY = SamplingParams(max_tokens=NEW, ignore_eos=True)
HELD: dict[str, Any] = {"method": "scripted", "num_draft_tokens": 4, "draft_ahead": False}
"""Held drafting with the default adaptive control (min_acceptance 0.3, back-off from 8 steps)."""
LATE = 16
"""A "late" prompt's drafter proposes nothing for its first LATE output tokens."""


class ScriptedDrafter:
    """Drafts by the prompt's script (`SCRIPTS`): "silent", "right", "wrong", "late"; "lookup" (or an
    unknown prompt) is the prompt lookup."""

    SCRIPTS: dict[tuple[int, ...], tuple[str, list[int]]] = {}
    """prompt -> (script, the model's greedy continuation)."""
    VOCAB = 0

    def __init__(self, token_ids: Sequence[int], min_ngram: int, max_ngram: int) -> None:
        self.prompt = tuple(token_ids)
        self.script, self.target = self.SCRIPTS.get(self.prompt, ("lookup", []))
        self.lookup = PromptLookup(token_ids, min_ngram, max_ngram)

    def update(self, token_ids: Sequence[int], num_resolved: int) -> None:
        self.lookup.update(token_ids, num_resolved)

    def propose(self, token_ids: Sequence[int], num_resolved: int, tail: Sequence[int], max_tokens: int) -> list[int]:
        start = num_resolved + len(tail) - len(self.prompt)  # output position of the first proposed token
        if self.script == "lookup":
            return self.lookup.propose(token_ids, num_resolved, tail, max_tokens)
        if self.script == "silent" or (self.script == "late" and start < LATE):
            return []
        right = self.target[start : start + max_tokens]
        return right if self.script in ("right", "late") else [(t + 1) % self.VOCAB for t in right]


def count_holds(eng: LocalEngine) -> Counter[tuple[int, ...]]:
    """Per prompt, the steps in which its sequence was ready to decode but not scheduled (held)."""
    holds: Counter[tuple[int, ...]] = Counter()
    schedule = eng.scheduler.schedule

    def counted() -> StepPlan:
        ready = [
            s for s in eng.scheduler.running
            if s.status is SequenceStatus.RUNNING and s.num_uncomputed_tokens == 1
            and not (s.num_pending_tokens and s.reached_length_limit)
        ]
        plan = schedule()
        decoding = {c.seq.seq_id for c in plan.decodes}
        holds.update(tuple(s.prompt_ids) for s in ready if s.seq_id not in decoding)
        return plan

    eng.scheduler.schedule = counted  # type: ignore[method-assign]
    return holds


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def prompts(llama: Path) -> list[list[int]]:
    rng = random.Random(7)
    with engine(llama) as eng:
        assert eng.tokenizer is not None
        vocab = eng.model_config.vocab_size
        words = ["the quick brown fox jumps over the lazy dog " * 6, "Alice works at Acme Corp in Paris. " * 4]
        return [list(eng.tokenizer(w).input_ids) for w in words] + [[rng.randrange(vocab) for _ in range(40)] for _ in range(4)]


@dataclass(frozen=True)
class Plain:
    """One-token decoding of `prompts`: greedy outputs, the engine's steps for the whole batch and for
    prompt 2 alone."""

    outputs: list[tuple[int, ...]]
    batch_steps: int
    alone_steps: int


@pytest.fixture(scope="module")
def plain(llama: Path, prompts: list[list[int]]) -> Plain:
    with engine(llama) as eng:
        outputs = [c.token_ids for c in eng.generate(prompts, GREEDY)]
        batch_steps = eng.stats["num_steps"]
        eng.generate([prompts[2]], GREEDY)
        return Plain(outputs, batch_steps, eng.stats["num_steps"] - batch_steps)


@pytest.fixture
def scripted(llama: Path, prompts: list[list[int]], plain: Plain, monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[int, str]], None]:
    """`script({index: name})`: the drafter's script for those prompts (the others use the prompt lookup)."""
    monkeypatch.setitem(DRAFTERS, "scripted", ScriptedDrafter)
    monkeypatch.setattr(ScriptedDrafter, "VOCAB", read_model_config(llama).vocab_size)
    monkeypatch.setattr(ScriptedDrafter, "SCRIPTS", {})

    def script(names: dict[int, str]) -> None:
        for i, name in names.items():
            ScriptedDrafter.SCRIPTS[tuple(prompts[i])] = (name, list(plain.outputs[i]))

    return script


def test_a_sequence_that_never_drafts_decodes_every_step_after_its_first(
    llama: Path, prompts: list[list[int]], plain: Plain, scripted: Callable[[dict[int, str]], None]
) -> None:
    outputs, batch_steps, alone_steps = plain.outputs, plain.batch_steps, plain.alone_steps
    scripted(dict.fromkeys(range(len(prompts)), "silent"))
    with engine(llama, HELD) as eng:
        holds = count_holds(eng)
        batched = eng.generate(prompts, GREEDY)
        # held once, for its first draft from the prefill's token; never again after that found nothing
        assert all(holds[tuple(p)] <= 1 for p in prompts) and sum(holds.values()) > 0
        assert eng.stats["num_steps"] <= batch_steps + 1
        holds.clear()
        alone = eng.generate([prompts[2]], GREEDY)[0]
        assert eng.stats["num_steps"] - batch_steps == alone_steps and holds[tuple(prompts[2])] == 1
        assert [c.token_ids for c in batched] == outputs and alone.token_ids == outputs[2]
        assert eng.stats["num_draft_tokens"] == 0
        assert_no_leak(eng)


def test_a_sequence_backing_off_is_not_held(llama: Path, prompts: list[list[int]], plain: Plain, scripted: Callable[[dict[int, str]], None]) -> None:
    outputs, alone_steps = plain.outputs, plain.alone_steps
    scripted({2: "wrong"})
    with engine(llama, HELD) as eng:
        holds = count_holds(eng)
        out = eng.generate([prompts[2]], GREEDY)[0]
        stats = eng.stats
    assert out.token_ids == outputs[2] and out.usage.num_accepted_tokens == 0
    # Four failed drafts pull the moving averages under their floors (accepted tokens per verified step
    # under 1.25, acceptance under 0.3); it backs off for 8 decode steps, then stays on probation: from
    # then on it proposes shadow drafts from its known tokens, never verified, and every one is wrong, so
    # it never drafts again. It waits for its token only before each draft and after the draft that
    # starts the back-off (before its outcome is known). Holding it throughout, also while backing off,
    # would cost a wait per token; probing with verified drafts cost a wait and a verify per probe.
    assert stats["num_verify_steps"] == 4
    assert holds[tuple(prompts[2])] == 4 + 1
    assert 20 <= stats["num_shadow_drafts"] <= NEW  # about one per decode step on probation (each wrong at once)
    assert stats["num_steps"] <= alone_steps + 1


def test_a_sequence_whose_matches_come_back_drafts_again(
    llama: Path, prompts: list[list[int]], plain: Plain, scripted: Callable[[dict[int, str]], None]
) -> None:
    outputs, alone_steps = plain.outputs, plain.alone_steps
    scripted({2: "late"})
    with engine(llama, HELD) as eng:
        out = eng.generate([prompts[2]], GREEDY)[0]
        stats = eng.stats
    assert out.token_ids == outputs[2]
    assert out.usage.num_accepted_tokens == out.usage.num_draft_tokens >= NEW - LATE - 8  # all right, after LATE
    # LATE steps one token at a time (never held), then a held step and a verify step per 5 tokens
    assert stats["num_steps"] < alone_steps - 8


def test_a_batch_mixing_drafting_and_other_sequences_is_exact(
    llama: Path, prompts: list[list[int]], plain: Plain, scripted: Callable[[dict[int, str]], None]
) -> None:
    outputs = plain.outputs
    scripted({2: "silent", 3: "right", 4: "wrong", 5: "late"})  # 0, 1: prompt lookup on repeating text
    with engine(llama, HELD) as eng:
        for _ in range(2):  # the second time around, the prompts come from the prefix cache
            batched = eng.generate(prompts, GREEDY)
            assert [c.token_ids for c in batched] == outputs
        assert_no_leak(eng)
    usage = [c.usage for c in batched]
    assert usage[2].num_draft_tokens == 0 and usage[4].num_accepted_tokens == 0
    assert usage[3].num_accepted_tokens == usage[3].num_draft_tokens > 0
    assert usage[5].num_accepted_tokens > 0 and usage[0].num_accepted_tokens + usage[1].num_accepted_tokens > 0
    assert eng.stats["num_voided_drafts"] == 0
