"""Draft verification on the device (verify.py): greedy acceptance, the gate, and the rejection rule's
output distribution on a tiny vocabulary (seeded, chi-square against the exact distribution)."""

from __future__ import annotations

import pytest
import torch

from terse.backend.local.verify import VerifyLayout, verify
from terse.backend.sampling import sample_next
from terse.backend.types import SamplingParams

GREEDY = SamplingParams()


def emitted(tokens: torch.Tensor, accepted: torch.Tensor, layout: VerifyLayout) -> list[list[int]]:
    ids, counts = tokens.tolist(), accepted.tolist()
    return [ids[f : f + a + 1] for f, a in zip(layout.first_rows, counts)]


def one_hot_logits(argmaxes: list[int], vocab: int = 8) -> torch.Tensor:
    logits = torch.randn(len(argmaxes), vocab, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 10.0
    return logits


def test_greedy_accepts_the_matching_prefix_and_emits_the_argmax_after_it() -> None:
    # seq 0: no draft; seq 1: draft 3 4 5 vs argmaxes 3 4 7 | 2; seq 2: draft 1 vs argmax 6 | 0
    layout = VerifyLayout.build([(), (3, 4, 5), (1,)])
    logits = one_hot_logits([2, 3, 4, 7, 2, 6, 0])
    out = verify(logits, layout, [GREEDY] * 3, [None] * 3, None)
    assert out.accepted.tolist() == [0, 2, 0]
    assert emitted(out.tokens, out.accepted, layout) == [[2], [3, 4, 7], [6]]
    assert out.last_rows.tolist() == [0, 3, 5]
    full = verify(one_hot_logits([3, 4, 5, 1]), VerifyLayout.build([(3, 4, 5)]), [GREEDY], [None], None)
    assert full.accepted.tolist() == [3] and full.tokens.tolist() == [3, 4, 5, 1]  # all accepted + the bonus


def test_a_failed_gate_rejects_the_whole_draft_and_keeps_row_zero_exact() -> None:
    layout = VerifyLayout.build([(3, 4), (3, 4)])
    logits = one_hot_logits([3, 4, 1, 3, 4, 1])
    out = verify(logits, layout, [GREEDY] * 2, [None] * 2, torch.tensor([True, False]))
    assert emitted(out.tokens, out.accepted, layout) == [[3, 4, 1], [3]]


def processed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution one-token sampling draws from: softmax(logits / T), top-p nucleus, renormalised."""
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < params.top_p
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return kept / kept.sum(-1, keepdim=True)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed `counts` under `probs` (cells with zero probability must be empty)."""
    total = counts.sum()
    assert counts[probs == 0].sum() == 0, "a token outside the nucleus was emitted"
    cells = probs > 0
    expected = probs[cells] * total
    stat = ((counts[cells] - expected) ** 2 / expected).sum()
    dof = int(cells.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8)])
def test_rejection_sampling_keeps_each_emitted_token_distributed_as_one_token_sampling(params: SamplingParams) -> None:
    torch.manual_seed(1234)
    vocab, num_seqs = 6, 30000
    rows = torch.tensor([[2.0, 1.5, 1.0, 0.2, -0.5, -1.0], [0.1, 1.2, 0.3, 1.1, -0.2, 0.4], [0.5, 0.0, 1.6, 0.2, 1.0, -2.0]])
    draft = (1, 3)  # a likely token, then a middling one
    layout = VerifyLayout.build([draft] * num_seqs)
    logits = rows.repeat(num_seqs, 1)  # [3 * num_seqs, V]
    out = verify(logits, layout, [params] * num_seqs, [None] * num_seqs, None)
    outputs = emitted(out.tokens, out.accepted, layout)
    target = processed(rows, params)  # [3, V]
    first = torch.bincount(torch.tensor([o[0] for o in outputs]), minlength=vocab).double()
    assert chi_square_p(first, target[0]) > 1e-3
    after_d1 = [o[1] for o in outputs if o[0] == draft[0]]
    assert chi_square_p(torch.bincount(torch.tensor(after_d1), minlength=vocab).double(), target[1]) > 1e-3
    after_d2 = [o[2] for o in outputs if o[:2] == list(draft)]
    assert chi_square_p(torch.bincount(torch.tensor(after_d2), minlength=vocab).double(), target[2]) > 1e-3
    # acceptance of d1 happens with probability p_0(d1)
    assert abs(len(after_d1) / num_seqs - float(target[0, draft[0]])) < 0.02


def test_seeded_rows_repeat_and_plain_rows_sample_as_without_drafts() -> None:
    params = SamplingParams(temperature=1.0, seed=5)
    rows = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    layout = VerifyLayout.build([(), (2, 9, 4)])

    def run() -> list[list[int]]:
        gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
        out = verify(torch.cat((rows[:1], rows)), layout, [params, params], gens, None)
        return emitted(out.tokens, out.accepted, layout)

    assert run() == run()
    plain = sample_next(rows[:1], [params], [torch.Generator().manual_seed(5)])
    assert run()[0] == plain.tolist()  # a sequence without a draft draws exactly one uniform, as before
