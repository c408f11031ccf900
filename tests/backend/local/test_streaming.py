"""Streaming KV (sinks + window) in the local engine: equality with the dense cache below the window,
the block bound per step, a step-by-step transformers reference past the window, mixed batches,
preemption, cancellation and the prefix cache."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from terse.backend.local.engine import LocalEngine
from terse.backend.local.kv_policy import KVCopy, SeqKV
from terse.backend.local.models.llama import rope_inv_freq
from terse.backend.local.models.loader import read_model_config
from terse.backend.local.scheduler import StepPlan
from terse.backend.local.sequence import Sequence
from terse.backend.local.streaming import StreamingKVPolicy
from terse.backend.types import SamplingParams, StreamingKV
from terse.errors import InvalidRequestError

BS = 4


@pytest.fixture(scope="module")
def llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")


def make_engine(path: Path, **fields: Any) -> LocalEngine:
    config: dict[str, Any] = {"kv_block_size": BS, "max_model_len": 512, "max_num_batched_tokens": 64}
    return LocalEngine.from_spec(str(path), **(config | fields))


def prompt_ids(seed: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, 500, (length,), generator=gen).tolist()


def greedy(max_tokens: int, streaming: StreamingKV | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, streaming_kv=streaming)


def held_blocks_per_step(eng: LocalEngine) -> list[tuple[int, int, int]]:
    """Wrap the runner: (seq_id, position of the step's first token, blocks held) per decode chunk."""
    records: list[tuple[int, int, int]] = []
    launch = eng.runner.launch

    def recording(plan: StepPlan) -> Any:
        for chunk in plan.decodes:
            kv = chunk.kv
            records.append((chunk.seq.seq_id, chunk.seq.num_computed_tokens, len(kv.block_ids) + len(kv.side_block_ids)))
        for seq in plan.preempted:  # -1 marks a preemption; the count is the tokens it must recompute
            records.append((seq.seq_id, -1, seq.num_tokens))
        return launch(plan)

    eng.runner.launch = recording  # type: ignore[method-assign]
    return records


def assert_no_leak(eng: LocalEngine) -> None:
    cached = eng.prefix_cache.num_cached_blocks if eng.prefix_cache is not None else 0
    assert eng.allocator.num_free_blocks + cached == eng.num_kv_blocks
    assert all(eng.allocator.ref_count(b) <= 1 for b in range(eng.num_kv_blocks))


def test_policy_counts_and_bound() -> None:
    policy = StreamingKVPolicy(sink_tokens=2, window_tokens=10)
    assert policy.num_sink_blocks(BS) == 1
    assert policy.max_decode_blocks(BS) == 2 * 1 + 3 + 1
    # The module docstring's example: sinks 4, window 8, first query at position 21 releases b1, b2.
    diagram = StreamingKVPolicy(sink_tokens=4, window_tokens=8)
    kv = SeqKV(diagram, [10, 11, 12, 13, 14, 15])
    assert diagram.num_releasable_blocks(kv, 21, BS) == 2
    assert diagram.release(kv, 21, BS) == [11, 12]
    assert (kv.block_ids, kv.num_dropped_tokens) == ([10, 13, 14, 15], 8)
    assert diagram.num_releasable_blocks(kv, 21, BS) == 0
    assert diagram.num_blocks_needed(kv, 22, BS) == 1  # the private sink copy; 22 - 8 tokens fit 4 blocks
    assert diagram.place(kv, [20], BS) == KVCopy([10], [20], 8)
    assert (kv.block_ids, kv.side_block_ids) == ([20, 13, 14, 15], [10])
    assert diagram.place(kv, [], BS) is None  # the sinks already sit at shift 8
    fresh = SeqKV(diagram, [0, 1, 2, 3, 4])
    for first_query, expected in ((14, 0), (15, 1)):  # releases start at sinks + window + one block = 16 tokens
        assert diagram.num_releasable_blocks(fresh, first_query, BS) == expected
    assert diagram.max_blocks(Sequence(1, [0] * 20, SamplingParams(max_tokens=500), max_len=4096), BS) == 2 + 2 + 1 + 5
    with pytest.raises(InvalidRequestError, match="window_tokens=0"):
        StreamingKV(sink_tokens=4, window_tokens=0)


def test_below_window_equals_dense_and_mixed_batch(llama: Path) -> None:
    streaming = StreamingKV(sink_tokens=4, window_tokens=40)
    prompts = [prompt_ids(i, 6 + 3 * i) for i in range(4)]
    with make_engine(llama) as dense_eng:
        dense = [c.token_ids for c in dense_eng.generate(prompts, greedy(28))]
    # 6..15 prompt tokens + 28 < sinks + window + one block: nothing is ever released.
    with make_engine(llama) as eng:
        handles = [eng.submit(p, greedy(28, streaming if i % 2 else None)) for i, p in enumerate(prompts)]
        mixed = [h.result().token_ids for h in handles]
        assert mixed == dense
        assert_no_leak(eng)


class StreamingReference:
    """StreamingLLM step by step on transformers: one token per forward, RoPE positions by place in
    the cache, released blocks cut out of the cache and the later keys rotated back (float32)."""

    def __init__(self, path: Path, policy: StreamingKVPolicy) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.policy = policy
        self.inv_freq = rope_inv_freq(read_model_config(path))

    def logits(self, ids: list[int], num_prompt: int) -> list[torch.Tensor]:
        """Logits of every query from the last prompt token on ([V] each)."""
        policy, model = self.policy, self.model
        num_sink_tokens = policy.num_sink_blocks(BS) * BS
        with torch.no_grad():
            out = model(torch.tensor([ids[:num_prompt]]), use_cache=True)
            cache, logits, dropped = out.past_key_values, [out.logits[0, -1]], 0
            for q in range(num_prompt, len(ids)):
                oldest_visible = q + 1 - policy.window_tokens
                num_release = max(0, oldest_visible // BS - num_sink_tokens // BS - dropped // BS) if oldest_visible > 0 else 0
                if num_release:
                    self._cut(cache, num_sink_tokens, num_release * BS)
                    dropped += num_release * BS
                out = model(torch.tensor([[ids[q]]]), position_ids=torch.tensor([[q - dropped]]), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits.append(out.logits[0, -1])
        return logits

    def _cut(self, cache: Any, start: int, length: int) -> None:
        angles = -length * self.inv_freq.double()
        cos, sin = torch.cat((angles, angles)).cos().float(), torch.cat((angles, angles)).sin().float()
        for layer in cache.layers:
            keys = layer.keys  # [1, KVH, S, D]
            later = keys[:, :, start + length :]
            half = later.shape[-1] // 2
            later = later * cos + torch.cat((-later[..., half:], later[..., :half]), dim=-1) * sin
            layer.keys = torch.cat((keys[:, :, :start], later), dim=2)
            layer.values = torch.cat((layer.values[:, :, :start], layer.values[:, :, start + length :]), dim=2)


@pytest.mark.parametrize("sink_tokens", [4, 0])
def test_matches_step_by_step_reference_past_the_window(llama: Path, sink_tokens: int) -> None:
    streaming = StreamingKV(sink_tokens=sink_tokens, window_tokens=16)
    policy = StreamingKVPolicy(streaming.sink_tokens, streaming.window_tokens)
    prompt = prompt_ids(7, 10)
    with make_engine(llama) as eng:
        captured: list[torch.Tensor] = []
        sampling_logits = eng.runner.model.logits  # called for sampled rows only: one per step

        def capture(hidden: torch.Tensor) -> torch.Tensor:
            logits = sampling_logits(hidden)
            captured.append(logits[0].clone())
            return logits

        eng.runner.model.logits = capture  # type: ignore[method-assign]
        completion = eng.submit(prompt, greedy(70, streaming)).result()
        assert_no_leak(eng)
    ids = prompt + list(completion.token_ids)
    reference = StreamingReference(llama, policy).logits(ids[:-1], len(prompt))
    assert len(reference) == len(captured) == 70
    for i in (0, 10, 20, 21, 30, 45, 69):  # before, at and after releases
        torch.testing.assert_close(captured[i], reference[i], atol=2e-4, rtol=1e-4)
    assert [int(r.argmax()) for r in reference] == list(completion.token_ids)


def test_thousands_of_tokens_hold_a_flat_number_of_blocks(llama: Path) -> None:
    streaming = StreamingKV(sink_tokens=4, window_tokens=32)
    policy = StreamingKVPolicy(streaming.sink_tokens, streaming.window_tokens)
    # 64 blocks of 4 tokens: the dense cache could hold 256 tokens; this request runs 2000.
    with make_engine(llama, num_kv_blocks=64, max_model_len=4096) as eng:
        with pytest.raises(InvalidRequestError, match="KV blocks"):
            eng.submit(prompt_ids(1, 8), greedy(2000))
        records = held_blocks_per_step(eng)
        completion = eng.submit(prompt_ids(1, 8), greedy(2000, streaming)).result()
        assert len(completion.token_ids) == 2000
        assert_no_leak(eng)
    held = [n for _, pos, n in records if pos >= 0]
    assert max(held) <= policy.max_decode_blocks(BS)
    assert len(set(held[100:])) <= 2  # flat: the window alternates between full and one block more
    assert max(held[100:]) == max(held[-100:])


def test_preemption_and_cancel_return_every_block(llama: Path) -> None:
    streaming = StreamingKV(sink_tokens=4, window_tokens=16)
    policy = StreamingKVPolicy(streaming.sink_tokens, streaming.window_tokens)
    prompts = [prompt_ids(20 + i, 9 + i) for i in range(6)]
    # 6 streaming requests hold up to 11 blocks each while decoding: 40 blocks force preemptions.
    with make_engine(llama, num_kv_blocks=40, enable_prefix_cache=False) as eng:
        records = held_blocks_per_step(eng)
        handles = [eng.submit(p, greedy(120, streaming)) for p in prompts]
        handles.append(eng.submit(prompt_ids(99, 12), greedy(60)))  # a dense request in the same batch
        completions = [h.result() for h in handles]
        assert eng.scheduler.num_preemptions > 0
        # Some streaming request was preempted past sinks + window + one block, i.e. after releasing blocks.
        assert any(pos == -1 and seq_id < 6 and n > 4 + 16 + BS for seq_id, pos, n in records)
        records[:] = [r for r in records if r[1] != -1]
        assert [len(c.token_ids) for c in completions] == [120] * 6 + [60]
        assert_no_leak(eng)
        streaming_ids = {seq_id for seq_id, _, _ in records if seq_id < 6}
        assert max(n for s, _, n in records if s in streaming_ids) <= policy.max_decode_blocks(BS)
        started = threading.Event()
        handle = eng.submit(prompt_ids(5, 10), greedy(400, streaming))
        for _ in handle:
            started.set()
            break
        handle.cancel()
        assert handle.result().finish_reason == "abort"
        assert_no_leak(eng)
    assert started.is_set()


def test_prefix_cache_blocks_survive_streaming_requests(llama: Path) -> None:
    streaming = StreamingKV(sink_tokens=4, window_tokens=16)
    shared = prompt_ids(3, 40)  # longer than sinks + window: releases start inside the prompt
    prompts = [shared + prompt_ids(30 + i, 5) for i in range(3)]
    with make_engine(llama, max_num_batched_tokens=16) as fresh:
        expected = [c.token_ids for c in fresh.generate(prompts, greedy(20))]
    with make_engine(llama, max_num_batched_tokens=16) as eng:
        first = eng.generate(prompts[:1], greedy(20))  # publishes the shared prompt blocks
        streamed = eng.generate(prompts, greedy(50, streaming))
        assert all(len(c.token_ids) == 50 for c in streamed)
        again = eng.generate(prompts, greedy(20))  # dense, from the (possibly shared) cached blocks
        assert [c.token_ids for c in again] == expected
        assert list(first[0].token_ids) == list(expected[0])
        assert_no_leak(eng)


def test_engine_default_streaming_kv(llama: Path) -> None:
    streaming = StreamingKV(sink_tokens=4, window_tokens=16)
    policy = StreamingKVPolicy(streaming.sink_tokens, streaming.window_tokens)
    with make_engine(llama, default_streaming_kv=streaming, num_kv_blocks=32) as eng:
        records = held_blocks_per_step(eng)
        completion = eng.submit(prompt_ids(4, 10), greedy(200)).result()
        assert len(completion.token_ids) == 200
        assert max(n for _, pos, n in records if pos >= 0) <= policy.max_decode_blocks(BS)
        assert_no_leak(eng)
