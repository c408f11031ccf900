"""`@program`: turn a function over a `ProgramState` into something that runs, batches, streams and awaits.

Every run executes the program function in its own thread with a fresh root state, so `run_batch`
items (and the forks inside each) issue their model calls concurrently and a batching backend serves
them together; `run()` is a batch of one. Failures keep their type and the program's traceback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from terse.backend.base import Backend
from terse.pipelines.program.expr import ProgramError
from terse.pipelines.program.state import Forks, ProgramState, RunContext

R = TypeVar("R")

Inputs = Mapping[str, Any] | Sequence[Any]
"""One batch item: keyword arguments (a mapping) or positional arguments (a sequence)."""


class ProgramRun(Generic[R]):
    """One started run: its live root `state`, `stream()` of a variable, `result()`, or `await run`."""

    def __init__(self, program: Program[R], backend: Backend, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._program = program
        self._args = args
        self._kwargs = kwargs
        self._ctx = RunContext(backend)
        self.state = ProgramState(self._ctx)
        """The root state, readable while the run goes on (reads wait for pending work)."""
        self._future: concurrent.futures.Future[ProgramState] = concurrent.futures.Future()

    def execute(self) -> None:
        """Run the program to the end in the calling thread (the runner's threads call this)."""
        start = time.perf_counter()
        try:
            value = self._program.fn(self.state, *self._args, **self._kwargs)
            self._ctx.sync_all()
        except BaseException as e:
            self._ctx.abort()
            self._finish(start)
            self._future.set_exception(e)
            return
        self._ctx.return_value = value
        self._finish(start)
        self._future.set_result(self.state)

    def _finish(self, start: float) -> None:
        self._ctx.wall_s = time.perf_counter() - start
        self._ctx.close_all()

    def result(self, timeout: float | None = None) -> ProgramState:
        """The finished root state; re-raises the program's error with its traceback."""
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError as e:
            raise TimeoutError(f"program {self._program.name} not finished after {timeout} s") from e

    def done(self) -> bool:
        return self._future.done()

    def stream(self, name: str) -> Iterator[str]:
        """Text deltas of the root state's `gen(name)` as they are generated."""
        return self.state.stream(name)

    async def astream(self, name: str) -> AsyncIterator[str]:
        """`async for delta in run.astream(name)`: the async form of `stream`."""
        handle = await asyncio.to_thread(self.state.handle, name)
        async for delta in handle.astream():
            yield delta

    def __await__(self) -> Any:
        return asyncio.wrap_future(self._future).__await__()


class Program(Generic[R]):
    """A program function `fn(state, *args, **kwargs)`. Call it on a state to compose programs;
    `run`/`submit`/`run_batch`/`arun` execute it on a backend."""

    def __init__(self, fn: Callable[..., R]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", repr(fn))
        functools.update_wrapper(self, fn)

    def __call__(self, state: ProgramState, *args: Any, **kwargs: Any) -> R:
        """Run the body on an existing state (a sub-program inside another program)."""
        if not isinstance(state, ProgramState):
            raise ProgramError(
                f"{self.name}(...) was called with {state!r} first; call {self.name}.run(..., backend=b) "
                f"to run it, or pass a ProgramState to compose it inside another program"
            )
        return self.fn(state, *args, **kwargs)

    def submit(self, *args: Any, backend: Backend, **kwargs: Any) -> ProgramRun[R]:
        """Start a run in a new thread and return at once."""
        run = ProgramRun(self, backend, args, kwargs)
        threading.Thread(target=run.execute, name=f"terse-program-{self.name}", daemon=True).start()
        return run

    def run(self, *args: Any, backend: Backend, **kwargs: Any) -> ProgramState:
        """Run to the end; returns the finished root state (variables, text, usage, critical path)."""
        run = ProgramRun(self, backend, args, kwargs)
        run.execute()
        return run.result()

    async def arun(self, *args: Any, backend: Backend, **kwargs: Any) -> ProgramState:
        """`await` a run; the program body runs in a thread so the event loop stays free."""
        return await self.submit(*args, backend=backend, **kwargs)

    def run_batch(
        self,
        inputs: Sequence[Inputs],
        *,
        backend: Backend,
        progress: bool = False,
        max_concurrency: int = 64,
    ) -> list[ProgramState]:
        """Run once per input (a kwargs mapping or an args sequence), up to `max_concurrency` at a time,
        so their model calls reach the backend together. Results are in input order; if any run failed,
        the first failure (in input order) is raised after all runs ended."""
        if max_concurrency < 1:
            raise ProgramError(f"max_concurrency={max_concurrency} must be >= 1 (e.g. 64)")
        runs = [self._make_run(item, backend) for item in inputs]
        if not runs:
            return []
        with concurrent.futures.ThreadPoolExecutor(min(max_concurrency, len(runs))) as pool:
            futures = [pool.submit(run.execute) for run in runs]
            if progress:
                from tqdm.auto import tqdm

                for _ in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc=self.name):
                    pass
        for index, run in enumerate(runs):
            if (error := run._future.exception()) is not None:
                error.add_note(f"in {self.name}.run_batch input {index}")
                raise error
        return [run.result() for run in runs]

    def _make_run(self, item: Inputs, backend: Backend) -> ProgramRun[R]:
        if isinstance(item, Mapping):
            return ProgramRun(self, backend, (), dict(item))
        if isinstance(item, str) or not isinstance(item, Sequence):
            raise ProgramError(
                f"run_batch input {item!r} must be a mapping of keyword arguments or a sequence of "
                f"positional arguments, e.g. [{{'question': 'Why?'}}] or [('Why?',)]"
            )
        return ProgramRun(self, backend, tuple(item), {})


def program(fn: Callable[..., R]) -> Program[R]:
    """Decorator: `@terse.program def qa(s, question): s += user(question); s += assistant(gen("answer"))`."""
    return Program(fn)


def fork(state: ProgramState, num_branches: int) -> Forks:
    """`state.fork(num_branches)` as a function (see `ProgramState.fork`)."""
    return state.fork(num_branches)
