"""Compression of a doc-QA job's questions on worker processes.

Scorer-free compression (BM25 ranking, sentence filter, exact fit) is pure Python and holds the GIL,
so on one process it competes with the engine's own Python loop. A `PreparePool` runs it on
`run.prepare_processes` worker processes instead, each with its own compressor (same settings and
target tokenizer, its own cache of context analyses): the main process only finds passages, sends
their texts, and builds the chat prompts from the results.

    main process                               worker processes (spawn by default)
    passages of batch N+1 ──► (question, texts) ──► PromptCompressor.compress ──► CompressionResult
    generation of batch N        (meanwhile)            one task per question; a question's error
                                                        comes back in its place

Questions over the same documents go to the same worker when they arrive together, so its analysis
cache serves them. A pool is only built when the compressor calls no model and its tokenizer can be
pickled; a pool that breaks (a worker killed) is closed and the rest of the job compresses in process.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from terse.compress.compressor import PromptCompressor
from terse.compress.config import Budget, CompressorConfig
from terse.compress.result import CompressionResult
from terse.compress.tokenizer import TargetTokenizer

_worker: PromptCompressor | None = None  # one per worker process, built by `_start`


def _start(tokenizer: TargetTokenizer, config: CompressorConfig) -> None:
    global _worker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: the pool is the parallelism
    _worker = PromptCompressor(None, tokenizer, config)


def _ready() -> int:
    return os.getpid()


def _compress(jobs: Sequence[tuple[tuple[str, ...], str]], budget: Budget) -> list[CompressionResult | Exception]:
    assert _worker is not None, "worker started without its compressor"
    out: list[CompressionResult | Exception] = []
    for contexts, question in jobs:
        try:
            out.append(_worker.compress(list(contexts), budget=budget, question=question))
        except Exception as e:  # a question that cannot be compressed fails alone
            out.append(e)
    return out


AUTO_MIN_QUESTIONS = 1024
"""Below this many pending questions "auto" prepares in process. Measured on an H200 host (16 cores,
8B shape, 56 questions, ~5 ms of preparation per question): 8 spawned workers made the job 4.5x
slower (10.3 s against 2.3 s), their start (each re-imports the main program: seconds with torch)
and their cold caches costing far more than the 0.3 s of preparation they could hide."""


def auto_processes(configured: int | str, num_questions: int | None = None) -> int:
    """Worker processes for `run.prepare_processes`: as configured, or ("auto") half the cores up to 8
    for a job of at least `AUTO_MIN_QUESTIONS` questions on 4 cores or more, none otherwise."""
    if isinstance(configured, int):
        return configured
    cores = os.cpu_count() or 1
    if cores < 4 or (num_questions is not None and num_questions < AUTO_MIN_QUESTIONS):
        return 0
    return min(8, cores // 2)


class PreparePool:
    """Worker processes that compress questions with copies of one compressor (see module docstring)."""

    def __init__(self, compressor: PromptCompressor, num_processes: int, start_method: str = "spawn") -> None:
        if compressor.scorer is not None:
            raise ValueError("a compressor that calls a model cannot run in worker processes")
        context = multiprocessing.get_context(start_method)
        self.num_processes = num_processes
        self._executor: ProcessPoolExecutor | None = ProcessPoolExecutor(
            max_workers=num_processes, mp_context=context, initializer=_start,
            initargs=(compressor.tokenizer, compressor.config),
        )
        # start every worker now, so their imports overlap the job's first batch
        self._warm = [self._executor.submit(_ready) for _ in range(num_processes)]

    @classmethod
    def for_compressor(cls, compressor: PromptCompressor | None, num_processes: int,
                       start_method: str = "spawn") -> PreparePool | None:
        """A pool, or None when processes cannot help: fewer than 2 wanted, no compressor, a compressor
        that calls a model (its backend lives in this process), or a tokenizer that cannot be pickled."""
        if compressor is None or compressor.scorer is not None or num_processes < 2:
            return None
        try:
            pickle.dumps((compressor.tokenizer, compressor.config))
        except Exception:
            return None
        return cls(compressor, num_processes, start_method)

    @property
    def alive(self) -> bool:
        return self._executor is not None

    def compress(self, jobs: Sequence[tuple[Sequence[str], str]], budget: Budget
                 ) -> list[CompressionResult | Exception] | None:
        """Compress each (contexts, question) job; results in order, an exception in a failed job's
        place. None when the pool broke (it is then closed; compress these in process instead)."""
        if self._executor is None:
            return None
        groups: dict[tuple[str, ...], list[int]] = {}
        for k, (contexts, _) in enumerate(jobs):
            groups.setdefault(tuple(contexts), []).append(k)
        chunks = _balance(list(groups.values()), self.num_processes)
        try:
            futures: list[tuple[list[int], Future[list[CompressionResult | Exception]]]] = [
                (chunk, self._executor.submit(_compress, [(tuple(jobs[k][0]), jobs[k][1]) for k in chunk], budget))
                for chunk in chunks
            ]
            out: list[CompressionResult | Exception | None] = [None] * len(jobs)
            for chunk, future in futures:
                for k, result in zip(chunk, future.result()):
                    out[k] = result
        except (BrokenProcessPool, OSError, pickle.PicklingError):
            self.close()
            return None
        return [r if r is not None else RuntimeError("no result from the worker") for r in out]

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PreparePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _balance(groups: list[list[int]], num_chunks: int) -> list[list[int]]:
    """Whole groups into at most `num_chunks` chunks of similar size (largest group first)."""
    chunks: list[list[int]] = [[] for _ in range(min(num_chunks, len(groups)))]
    for group in sorted(groups, key=len, reverse=True):
        min(chunks, key=len).extend(group)
    return [c for c in chunks if c]
