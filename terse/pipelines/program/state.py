"""`ProgramState`: the text a program builds, executed lazily so that branches and batch items overlap.

`s += expr` never waits for the model. Each state owns one worker thread that applies its expressions
in order; a `gen` submits to the backend from that worker and waits there. Reading the state
(`s["name"]`, `s.text`, `s.fork()`) waits for its queue to drain. So

    forks = s.fork(3)
    for f in forks:
        f += assistant(gen("idea"))      # returns at once: three requests reach the backend together
    forks.join()

puts all three generations in flight at the same time, and a batching backend runs them as one batch
over the shared prefix. Program threads of `run_batch` items overlap the same way.

Text layout: closed chat messages, rendered with `Backend.render_chat` (which ends where the assistant
reply starts), then the open assistant turn `tail`:

    render_chat(messages) + tail          e.g. "<|user|>\\nHi<|end|>\\n<|assistant|>\\n" + "Hello, I"

With no chat messages, `tail` is raw text and generation continues it as is.
"""

from __future__ import annotations

import concurrent.futures
import linecache
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from terse.backend.base import Backend
from terse.backend.constraints import ChoiceConstraint
from terse.backend.handle import RequestHandle
from terse.backend.types import ZERO_USAGE, Message, SamplingParams, Usage
from terse.errors import TerseError, UnsupportedOperationError
from terse.pipelines.program.expr import Expr, Gen, ProgramError, Select, Turn, VariableError

_PACKAGE_DIR = str(Path(__file__).parent)


def _program_site() -> str:
    """The innermost stack frame outside this package: the program line that wrote the expression."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    code = frame.f_code
    line = linecache.getline(code.co_filename, frame.f_lineno).strip()
    return f'File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}: {line}'


class RunContext:
    """What every state of one program run shares: the backend, token accounting, in-flight requests."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.states: list[ProgramState] = []
        self.return_value: Any = None
        self.wall_s = 0.0
        self._usage = ZERO_USAGE
        self._handles: set[RequestHandle] = set()
        self._lock = threading.Lock()
        self.aborted = False

    @property
    def usage(self) -> Usage:
        return self._usage

    def add_usage(self, usage: Usage) -> None:
        with self._lock:
            self._usage = self._usage + usage

    def track(self, handle: RequestHandle, live: bool) -> None:
        with self._lock:
            if live:
                self._handles.add(handle)
            else:
                self._handles.discard(handle)
        if live and self.aborted:
            handle.cancel()

    def abort(self) -> None:
        """Stop the run: cancel requests in flight; workers skip what is still queued."""
        with self._lock:
            self.aborted = True
            handles = list(self._handles)
        for handle in handles:
            handle.cancel()

    def sync_all(self) -> None:
        """Wait for every state of the run; raise the first failure."""
        for state in list(self.states):
            state._sync()

    def close_all(self) -> None:
        for state in list(self.states):
            state._close()


class ProgramState:
    """The state a program appends to (see the module docstring for the execution model).

    Reading methods wait for this state's pending expressions and raise the first error one of them hit
    (a `ProgramError` naming the program line, or the backend's own typed `TerseError` with that line
    added as a note). Run-wide figures (`usage`, `critical_path_s`) cover every branch of the run.
    """

    def __init__(
        self,
        ctx: RunContext,
        messages: list[Message] | None = None,
        tail: str = "",
        variables: dict[str, str] | None = None,
        clock_s: float = 0.0,
    ) -> None:
        self._ctx = ctx
        self._messages: list[Message] = list(messages or [])
        self._tail = tail
        self._variables: dict[str, str] = dict(variables or {})
        self._choice_logprobs: dict[str, tuple[float, ...]] = {}
        self._clock_s = clock_s  # model time on this state's critical path so far
        self._handles: dict[str, RequestHandle] = {}  # first gen of each name, for streaming
        self._cond = threading.Condition()
        self._num_pending = 0
        self._closed = False
        self._error: BaseException | None = None
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        ctx.states.append(self)

    # -- writing -------------------------------------------------------------------------------------
    def __iadd__(self, expr: Expr) -> ProgramState:
        if not isinstance(expr, str | Gen | Select | Turn):
            raise ProgramError(
                f"cannot append {expr!r} to a program state; append a string, system/user/assistant(...), "
                f"gen(...) or select(...)"
            )
        if self._closed:
            raise ProgramError("this program run has finished; its state can be read but not extended")
        site = _program_site()
        with self._cond:
            self._num_pending += 1
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="terse-program")
        self._worker.submit(self._run_expr, expr, site)
        return self

    def fork(self, num_branches: int) -> Forks:
        """`num_branches` copies of this state (text, messages, variables), each extended on its own;
        they all start with this state's text, so a prefix-caching backend prefills it once."""
        if not isinstance(num_branches, int) or num_branches < 1:
            raise ProgramError(f"fork({num_branches!r}): the number of branches must be an int >= 1")
        self._sync()
        return Forks(
            self,
            [
                ProgramState(self._ctx, self._messages, self._tail, self._variables, self._clock_s)
                for _ in range(num_branches)
            ],
        )

    # -- reading -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> str:
        self._sync()
        if name not in self._variables:
            raise VariableError(
                f"no variable {name!r} in this state; set ones are {sorted(self._variables)} "
                f"(variables of forks are read from the fork, e.g. forks[0][{name!r}] or forks.values({name!r}))"
            )
        return self._variables[name]

    def get(self, name: str, default: str | None = None) -> str | None:
        self._sync()
        return self._variables.get(name, default)

    @property
    def text(self) -> str:
        """The full prompt text so far: what the next `gen` would continue."""
        self._sync()
        return self._render()

    @property
    def messages(self) -> list[Message]:
        """The chat so far; an open assistant turn is included as an assistant message."""
        self._sync()
        open_turn: list[Message] = [{"role": "assistant", "content": self._tail}] if self._tail else []
        return [*self._messages, *open_turn]

    @property
    def variables(self) -> dict[str, str]:
        self._sync()
        return dict(self._variables)

    def choice_logprobs(self, name: str) -> tuple[float, ...]:
        """Total log-probability of each choice of `select(name, ...)`, in the choices' order."""
        self._sync()
        if name not in self._choice_logprobs:
            raise VariableError(
                f"no select({name!r}, method='logprob') ran in this state; selects with log-probabilities were "
                f"{sorted(self._choice_logprobs)}"
            )
        return self._choice_logprobs[name]

    def stream(self, name: str) -> Iterator[str]:
        """Text deltas of the first `gen(name)` of this state as they are generated; waits for it to
        be submitted. Raises `VariableError` if the run ends without such a gen."""
        yield from self.handle(name)

    def handle(self, name: str) -> RequestHandle:
        """The request of the first `gen(name)` of this state, once submitted (blocks until then);
        `VariableError` if the run ends without one."""
        with self._cond:
            while name not in self._handles:
                if self._closed or self._error is not None:
                    raise VariableError(f"the program did not generate {name!r} in this state")
                self._cond.wait()
            return self._handles[name]

    @property
    def usage(self) -> Usage:
        """Tokens of the whole run so far (prompt, cached prompt, completion), every branch included."""
        return self._ctx.usage

    @property
    def critical_path_s(self) -> float:
        """Model seconds along the longest chain of dependent calls of the run (branches overlap)."""
        return max(s._clock_s for s in self._ctx.states)

    @property
    def wall_s(self) -> float:
        """Seconds the whole run took (set when the run finishes)."""
        return self._ctx.wall_s

    @property
    def return_value(self) -> Any:
        """What the program function returned (set when the run finishes)."""
        return self._ctx.return_value

    # -- execution (worker thread) ----------------------------------------------------------------------
    def _run_expr(self, expr: Expr, site: str) -> None:
        try:
            if self._error is None and not self._ctx.aborted:
                self._apply(expr)
        except BaseException as e:
            self._error = _located(e, expr, site)
        finally:
            with self._cond:
                self._num_pending -= 1
                self._cond.notify_all()

    def _apply(self, expr: Expr) -> None:
        if isinstance(expr, str):
            self._tail += expr
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        else:
            self._close_turn()
            if expr.role != "assistant":
                text = "".join(p for p in expr.parts if isinstance(p, str))
                self._messages.append({"role": expr.role, "content": text})
                return
            for part in expr.parts:
                self._apply(part)
            self._messages.append({"role": "assistant", "content": self._tail})
            self._tail = ""

    def _close_turn(self) -> None:
        """Make the open tail a finished assistant message before another turn starts."""
        if not self._tail:
            return
        if not self._messages:
            raise ProgramError(
                f"raw text {self._tail[:40]!r} comes before the first chat message; use only chat turns, "
                f"or only raw text, or put the text inside system(...)/user(...)"
            )
        self._messages.append({"role": "assistant", "content": self._tail})
        self._tail = ""

    def _render(self) -> str:
        return (self._ctx.backend.render_chat(self._messages) if self._messages else "") + self._tail

    def _gen(self, expr: Gen) -> None:
        start = time.perf_counter()
        handle = self._ctx.backend.submit(self._render(), expr.params)
        self._ctx.track(handle, live=True)
        if expr.name is not None and expr.name not in self._handles:
            with self._cond:
                self._handles[expr.name] = handle
                self._cond.notify_all()
        try:
            completion = handle.result()
        finally:
            self._ctx.track(handle, live=False)
        self._clock_s += time.perf_counter() - start
        self._ctx.add_usage(completion.usage)
        self._tail += completion.text
        if expr.name is not None:
            self._variables[expr.name] = completion.text

    def _select(self, expr: Select) -> None:
        if expr.method == "constrained":  # the gen(choices=...) grammar, greedy
            longest = max(len(c.encode()) for c in expr.choices)
            params = SamplingParams(max_tokens=longest + 1, constraint=ChoiceConstraint(expr.choices))
            self._gen(Gen(expr.name, params))
            return
        backend = self._ctx.backend
        prefix = self._render()
        start = time.perf_counter()
        try:
            scores = backend.score(list(expr.choices), prefix=prefix)
        except UnsupportedOperationError as e:
            raise UnsupportedOperationError(
                f"select({expr.name!r}) needs per-token log-probabilities, but backend {backend.model_name!r} "
                f"cannot score ({e}); use a backend that implements score() (local: or hf:), or "
                f"select(..., method='constrained')"
            ) from e
        self._clock_s += time.perf_counter() - start
        totals = tuple(s.total_logprob for s in scores)
        best = totals.index(max(totals))  # first of equals
        prefix_len = backend.count_tokens(prefix) if prefix else 0
        self._ctx.add_usage(Usage(sum(prefix_len + len(s.token_ids) for s in scores), 0, 0))
        self._choice_logprobs[expr.name] = totals
        self._tail += expr.choices[best]
        self._variables[expr.name] = expr.choices[best]

    # -- synchronisation -------------------------------------------------------------------------------
    def _sync(self) -> None:
        with self._cond:
            while self._num_pending:
                self._cond.wait()
        if self._error is not None:
            raise self._error

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.shutdown(wait=False)


def _located(error: BaseException, expr: Expr, site: str) -> BaseException:
    """The error to raise at the program's next read, naming the program line that caused it."""
    description = expr.describe() if not isinstance(expr, str) else f"text {expr[:30]!r}"
    if isinstance(error, TerseError):  # keep the backend's typed error; say where it came from
        error.add_note(f"while running {description} from {site}")
        return error
    located = ProgramError(f"{description} failed: {type(error).__name__}: {error}\n  from {site}")
    located.__cause__ = error
    return located


class Forks(list[ProgramState]):
    """The branches of one `fork()`; `join()` waits for all of them."""

    def __init__(self, parent: ProgramState, branches: list[ProgramState]) -> None:
        super().__init__(branches)
        self.parent = parent

    def join(self) -> ProgramState:
        """Wait for every branch (raising the first failure); the parent's critical path then runs
        through the slowest branch. Returns the parent."""
        for branch in self:
            branch._sync()
        self.parent._sync()
        self.parent._clock_s = max([self.parent._clock_s, *(b._clock_s for b in self)])
        return self.parent

    def values(self, name: str) -> list[str]:
        """Variable `name` of every branch, in branch order."""
        return [branch[name] for branch in self]
