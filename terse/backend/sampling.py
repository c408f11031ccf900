"""Next-token sampling shared by the local engine and the transformers backend.

Greedy rows take the argmax (`greedy_ids`: a one-launch Triton kernel on CUDA, torch.argmax elsewhere).
Other rows sample from softmax(logits / temperature) restricted to the top-p nucleus, by inverse-CDF
with one uniform number per row. A row with its own `torch.Generator` (a request with a seed) draws
its number from it, so its sample does not depend on what else is in the batch; rows without a seed
share one batched draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from terse.backend.types import SamplingParams, TokenLogprob


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded for one request, or None when the request has no seed."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


_ARGMAX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dim, exactly `logits.argmax(dim=-1)` (first index of the maximum, NaN largest).

    logits: [B, V]. Returns int64 [B], a new tensor. CUDA rows of a float32/16/bfloat16 tensor with a unit
    last stride go through `terse.kernels.argmax` (one launch, capturable in a CUDA graph): torch's
    reduction spends tens of microseconds on one vocabulary-wide row. Anything else takes torch.argmax."""
    if (
        logits.device.type == "cuda"
        and logits.dim() == 2
        and logits.dtype in _ARGMAX_DTYPES
        and logits.shape[1] > 0
        and logits.stride(1) == 1
    ):
        from terse.kernels.argmax import argmax_rows  # triton is imported only where it runs

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row.

    logits: [B, V] (any float dtype); params and generators: one per row. Returns token ids [B] int64.
    """
    num_rows = logits.shape[0]
    assert len(params) == num_rows == len(generators), "one SamplingParams and generator per row"
    out = greedy_ids(logits)  # [B]
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return out
    rows = torch.tensor(sampled_rows, device=logits.device)
    sorted_probs, sorted_ids = nucleus_probs(logits[rows], [params[i] for i in sampled_rows])
    cum = sorted_probs.cumsum(dim=-1)  # [R, V], last column = kept mass
    uniforms = row_uniforms([generators[i] for i in sampled_rows], logits.device)  # [R]
    targets = uniforms * cum[:, -1]
    pick = torch.searchsorted(cum, targets[:, None], right=True).clamp_(max=cum.shape[-1] - 1)  # [R, 1]
    out[rows] = sorted_ids.gather(-1, pick).squeeze(-1)
    return out


def nucleus_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution each row samples from: softmax(logits / temperature) restricted to the top-p
    nucleus (not renormalised). logits: [R, V], one non-greedy `params` per row. Returns (probs sorted
    in descending order [R, V] float32, with the tokens outside the nucleus zeroed; their token ids [R, V])."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    top_ps = torch.tensor([p.top_p for p in params], device=logits.device)
    probs = torch.softmax(logits.float() / temps[:, None], dim=-1)  # [R, V]
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    cum = sorted_probs.cumsum(dim=-1)
    # Drop a token when the mass before it already reaches top_p; the first token always stays.
    return sorted_probs.masked_fill((cum - sorted_probs) >= top_ps[:, None], 0.0), sorted_ids


def row_uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) number per row: seeded rows from their generator, the rest from one shared draw."""
    values = torch.rand(len(generators), device=device)
    for i, gen in enumerate(generators):
        if gen is not None:
            values[i] = torch.rand(1, generator=gen, device=device)[0]
    return values


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """Set the logits of disallowed tokens to -inf, in place, for the given rows only.

    logits: [B, V] on any device; bitmask: [>= len(rows), ceil(V / 32)] int32 on the CPU, row i for
    logits row rows[i], bit t of word t // 32 set when token t is allowed. Other rows are not touched, so
    an unconstrained request decodes exactly as in a batch without constraints.
    """
    num_rows = len(rows)
    if num_rows == 0:
        return
    vocab = logits.shape[-1]
    words = bitmask[:num_rows]
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) and logits.is_contiguous():
        # numpy on one core: torch's element-wise ops on a busy host pay for thread hand-offs per call
        allowed = np.unpackbits(words.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab]  # [R, V]
        array = logits.numpy()
        if num_rows == array.shape[0] and list(rows) == list(range(num_rows)):
            np.putmask(array, allowed == 0, -np.inf)
            return
        index = np.asarray(rows)
        picked = array[index]
        np.putmask(picked, allowed == 0, -np.inf)
        array[index] = picked
        return
    on_device = words.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    bits = (on_device[:, :, None] >> shifts) & 1  # [R, W, 32], unpacked on the device: 1/8 of the bytes cross
    disallowed = bits.view(num_rows, -1)[:, :vocab] == 0
    if num_rows == logits.shape[0] and list(rows) == list(range(num_rows)):
        logits.masked_fill_(disallowed, float("-inf"))
        return
    index_t = torch.tensor(list(rows), device=logits.device)
    logits[index_t] = logits[index_t].masked_fill(disallowed, float("-inf"))


class LogprobRows(NamedTuple):
    """Log-probabilities of the tokens sampled for some rows of a batch, left where the logits are.

    Built by `logprob_rows` without reading anything back (no device synchronisation); `entries` reads
    them (move the tensors to the host first to avoid a synchronising read on a GPU)."""

    rows: list[int]
    """The batch rows these values belong to."""
    num_top: list[int]
    """Alternatives each of those rows asked for (`SamplingParams.logprobs`)."""
    chosen: torch.Tensor
    """[R] float32: log P(sampled token)."""
    top_values: torch.Tensor
    """[R, K] float32, K = max(num_top): the most likely tokens' log-probabilities, most likely first."""
    top_ids: torch.Tensor
    """[R, K] int64: their token ids."""

    def entries(self, token_ids: Sequence[int]) -> list[TokenLogprob | None]:
        """One entry per row of the batch (`token_ids`: its sampled ids, [B]); None for rows not here."""
        out: list[TokenLogprob | None] = [None] * len(token_ids)
        chosen, values, ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
        for r, (row, k) in enumerate(zip(self.rows, self.num_top)):
            top = tuple((int(t), float(v)) for t, v in zip(ids[r][:k], values[r][:k]))
            out[row] = TokenLogprob(int(token_ids[row]), float(chosen[r]), top)
        return out


def logprob_rows(logits: torch.Tensor, token_ids: torch.Tensor, num_top: list[int], rows: list[int]) -> LogprobRows:
    """The sampled tokens' log-probabilities and top alternatives of the rows that ask for them.

    logits: [R, V] of those rows only (the logits their tokens were sampled from); token_ids: [R].
    One log_softmax and one topk; nothing is read back."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = logprobs.gather(-1, token_ids[:, None])[:, 0]  # [R]
    k = max(num_top, default=0)
    if k:
        top_values, top_ids = logprobs.topk(k, dim=-1)  # [R, K]
    else:
        top_values, top_ids = logprobs[:, :0], token_ids.new_empty(logprobs.shape[0], 0)
    return LogprobRows(rows, num_top, chosen, top_values, top_ids)


def sampled_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
) -> list[TokenLogprob | None]:
    """Each row's chosen-token log-probability and top alternatives, for rows whose params ask for them.

    logits: [B, V] (the logits the tokens were sampled from); token_ids: [B]. Rows without
    `params[i].logprobs` get None. One log_softmax and one topk over the rows that ask.
    """
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return [None] * len(params)
    index = torch.tensor(rows, device=logits.device)
    asked = logprob_rows(logits[index], token_ids[index], [int(params[i].logprobs or 0) for i in rows], rows)
    return asked.entries(token_ids.tolist())
