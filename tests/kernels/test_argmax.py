"""The one-launch Triton argmax against torch.argmax (Triton's CPU interpreter, small rows and chunks):
random rows, ties inside and across chunks, constant and -inf rows, NaN anywhere, ragged last chunks,
several rows, every supported dtype; the launcher's input errors; counters left at zero."""

from __future__ import annotations

import pytest
import torch

import tests.kernels  # noqa: F401  (switches Triton's interpreter on before triton loads)
from terse.backend.sampling import greedy_ids
from terse.errors import KernelInputError
from terse.kernels.argmax import _COUNTERS, MAX_CHUNKS, MIN_CHUNK, argmax_rows, chunk_size

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")


def check(logits: torch.Tensor, chunk: int | None) -> None:
    got = argmax_rows(logits, chunk=chunk)
    want = torch.argmax(logits, dim=-1)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_rows", "vocab", "chunk"), [(1, 1, 16), (1, 100, 16), (3, 257, 32), (5, 64, 64), (2, 40, 128)])
def test_random_rows(dtype: torch.dtype, num_rows: int, vocab: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    check((4 * torch.randn(num_rows, vocab, generator=gen)).to(dtype), chunk)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_keep_first_index(dtype: torch.dtype) -> None:
    logits = torch.zeros(6, 70)  # chunk 16: chunks [0, 16), [16, 32), ..., [64, 70) ragged
    logits[0, [3, 9]] = 2.0  # inside one chunk
    logits[1, [15, 16, 69]] = 2.0  # across a chunk border, and in the ragged last chunk
    logits[2, [40, 20]] = 2.0  # later chunk listed first: the smaller index still wins
    logits[3, 69] = 2.0  # the only maximum is the last element
    logits[4, [33, 47, 48, 68]] = -1.0  # maximum 0 everywhere else: index 0
    logits[5] = 1.5  # constant row
    check(logits.to(dtype), 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_rows(dtype: torch.dtype) -> None:
    logits = torch.full((4, 50), -INF)  # row 0: all -inf -> 0
    logits[1, 37] = -1e4  # one finite value among -inf
    logits[2, [5, 44]] = INF  # +inf ties across chunks
    logits[3, 49] = INF
    check(logits.to(dtype), 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "nan_cols",
    [[0], [49], [20, 3], [17, 33], [48, 49], list(range(50))],
    ids=["first", "last", "two-unordered", "across-chunks", "ragged-chunk", "all"],
)
def test_nan_is_largest_first_wins(dtype: torch.dtype, nan_cols: list[int]) -> None:
    gen = torch.Generator().manual_seed(len(nan_cols))
    logits = torch.randn(3, 50, generator=gen)
    logits[0, nan_cols] = NAN
    logits[1, nan_cols] = NAN
    logits[1, 10] = INF  # +inf does not beat NaN
    logits[2, :] = -INF
    logits[2, nan_cols] = NAN
    logits = logits.to(dtype)
    assert torch.argmax(logits, dim=-1).tolist() == [min(nan_cols)] * 3  # torch's rule, the one matched here
    check(logits, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_chunk_and_strided_rows(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(3, 2 * MIN_CHUNK + 300, generator=gen).to(dtype)
    wide[1, MIN_CHUNK + 7] = 50.0  # in the second default chunk
    rows = wide[:, : MIN_CHUNK + 900]  # row stride > V: rows contiguous, tensor not
    check(rows, None)
    check(wide, None)


def test_chunk_size() -> None:
    assert chunk_size(128256) == MIN_CHUNK  # the 8B vocabulary: 63 programs per row
    assert chunk_size(10) == MIN_CHUNK
    huge = 3_000_000
    size = chunk_size(huge)
    assert size & (size - 1) == 0 and -(-huge // size) <= MAX_CHUNKS


def test_repeated_launches_reset_counters() -> None:
    gen = torch.Generator().manual_seed(6)
    first = torch.randn(4, 90, generator=gen)
    second = torch.randn(2, 90, generator=gen)
    for logits in (first, second, first):
        check(logits, 16)
        assert int(_COUNTERS[logits.device][:8].abs().sum()) == 0


def test_empty_batch() -> None:
    assert argmax_rows(torch.randn(0, 30)).shape == (0,)


@pytest.mark.parametrize(
    ("logits", "chunk", "match"),
    [
        (torch.randn(30), None, r"\[B, V\]"),
        (torch.randn(2, 3, 30), None, r"\[B, V\]"),
        (torch.randn(2, 30).double(), None, "float64"),
        (torch.randint(0, 9, (2, 30)), None, "int64"),
        (torch.randn(2, 0), None, "V = 0"),
        (torch.randn(30, 2).t(), None, "last stride"),
        (torch.randn(2, 30), 24, "power of two"),
        (torch.randn(1, 16 * MAX_CHUNKS + 1), 16, "chunks"),
    ],
)
def test_input_errors(logits: torch.Tensor, chunk: int | None, match: str) -> None:
    with pytest.raises(KernelInputError, match=match):
        argmax_rows(logits, chunk=chunk)


def test_greedy_ids_on_cpu_is_torch_argmax() -> None:
    logits = torch.tensor([[1.0, NAN, 3.0], [2.0, 2.0, 1.0]])
    assert greedy_ids(logits).tolist() == torch.argmax(logits, dim=-1).tolist() == [1, 0]
    assert greedy_ids(logits.double()).tolist() == [1, 0]  # dtypes the kernel does not take
