"""Budget-aware closing: a constrained request that runs out of tokens still ends with a complete value.

Each constrained request keeps a closing plan: a short token sequence that would complete its grammar from
where it stands (terse.backend.closing). With R tokens left to generate (max_tokens left, or context room
if smaller) and a plan of L tokens, each step is one of:

    R <= 2 L + M     CHECK   the model samples as usual (grammar mask); the sampled token is then
                             checked: when no completion is found that fits in the R - 1 tokens
                             after it (greedy walk, then a search bounded by CHECK_SEARCH_POPS), the
                             plan's first token replaces it. Once R == L every token the model
                             picks off a shortest path is replaced: the request writes the plan
                             and finishes "length" with a complete value.
    otherwise        FREE    nothing to do
    R < L            FORCE   only when a token far from the budget made the plan grow by more than
                             the margin M: the plan's tokens as far as the budget goes (the value
                             stays incomplete; not seen in the tests and benchmarks)

The margin M covers what one token may add to the closing length (opening an object whose required
properties must then be written, starting another tool call): per grammar, the larger of ZONE, the
length of its whole shortest output plus 2, and twice the largest growth seen so far.

A token the model samples on its own is kept whenever a completion still fits after it, so a request that
finishes on its own within its budget is not changed, except where the plan is not the shortest
completion (closing.py: the searches are bounded) and the model would have finished in its last tokens.
CHECK needs the sampled token on the host before the next step: on a GPU that is one synchronisation per
step while any request is that close to its budget. A FREE row costs a plan check (a few microseconds)
after a token that left the plan's path, and a replan once the budget comes within reach of the last
plan's length plus one token per token generated since.

Not thread-safe: one owner at a time (the decode loop, or the mask worker while it holds the rows).
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

from terse.backend.closing import ByteClasses, ClosingPlanner
from terse.errors import InvalidRequestError

MAX_MIN_LEN = 4096
"""Longest complete output the compiler looks for (a grammar that needs more is never refused)."""
ZONE = 16
"""Smallest margin M for CHECK beyond twice the plan's length."""
RETRY_AFTER = 8
"""Tokens to wait before searching again when no plan was found."""
CHECK_SEARCH_POPS = 150
"""Search budget (states) for a sampled token that leaves the plan in a CHECK step, when the greedy
completion after it does not fit: this runs per sampled token near the budget, and most such searches
find nothing and end only at their bound (~50 µs a state). Giving up early is safe: the plan's token
replaces the model's. The ones that succeeded on the benchmarks' tiny random models took at most 129
states; at max_tokens = shortest + 8 there, 636 of 640 outputs are the same as with the full 600."""


class BudgetStep(NamedTuple):
    """What one step of a constrained request must do about its budget."""

    force: int | None
    """The token the step must produce (FORCE), or None."""
    check: bool
    """Sample freely, then `BudgetGuard.check` the sampled token (CHECK)."""


FREE = BudgetStep(None, False)
CHECK = BudgetStep(None, True)


class BudgetGuard:
    """One constrained request's closing plan, kept in step with its grammar matcher.

    The owner calls `step(matcher, remaining)` before each sample, `check(...)` on the sampled token when
    the step said so, and `on_token(token)` after the matcher consumed a token."""

    def __init__(self, shared: GrammarBudget) -> None:
        self._shared = shared
        self._planner = shared.planner
        self._classes = shared.classes
        self._plan: list[int] | None = None
        """A completion valid from the matcher's current state (None: unknown)."""
        self._verify = False
        """The plan was valid before the last token: check it before use."""
        self._stale_len = shared.quick_len or 0
        """Length of the last known plan."""
        self._since = 0
        """Tokens consumed since that plan was valid."""
        self._after: tuple[int, list[int]] | None = None
        """(token, plan after it) found while checking a sampled token."""
        self._retry_at = 0
        self._overrun = False
        """The plan is longer than the budget and no shorter one was found (do not search every step)."""
        self.closed = False
        """True once the budget decided a token (FORCE, or a CHECK that replaced the model's token)."""

    def on_token(self, token: int) -> None:
        """The matcher consumed `token`: move the plan along."""
        after, self._after = self._after, None
        if self._plan is None:
            self._since += 1
        elif self._plan and self._plan[0] == token:
            self._plan = self._plan[1:]
        elif after is not None and after[0] == token:
            self._plan, self._overrun = after[1], False
        else:
            self._verify = True

    def step(self, matcher: Any, remaining: int) -> BudgetStep:
        """The decision for the next token, `remaining` tokens (this one included) left to generate."""
        plan = self._current(matcher, remaining)
        if plan is None:
            return FREE
        if len(plan) > remaining and not self._overrun:  # the quick plan does not fit: look harder
            better = self._planner.fit(matcher, remaining, self._classes)
            if better is not None:
                self._plan = plan = better
            self._overrun = better is None
        if len(plan) > remaining:  # cannot fit any more (a token far from the budget grew the plan by
            self.closed = True  # more than the zone's margin): close as far as the budget goes
            return BudgetStep(plan[0], False)
        if remaining <= 2 * len(plan) + self._shared.margin:
            return CHECK
        return FREE

    def check(self, matcher: Any, token: int, remaining: int) -> int:
        """The token to keep for a CHECK step: `token` itself when a completion still fits in the
        `remaining - 1` tokens after it, else the plan's first token (EOS when the plan is empty)."""
        plan = self._plan
        assert plan is not None, "check() follows a CHECK step, which has a plan"
        planner = self._planner
        if token in planner.eos_ids or (plan and token == plan[0]):
            return token
        if 1 + len(plan) <= remaining and matcher.validate_tokens([token, *plan, planner.eos]) == len(plan) + 2:
            self._after = (token, plan)
            return token
        child = matcher.deep_copy()
        if child.consume_token(token):
            found = planner.fit(child, remaining - 1, self._classes, CHECK_SEARCH_POPS)
            if found is not None:
                self._shared.observe_growth(1 + len(found) - len(plan))
                self._after = (token, found)
                return token
        self.closed = True
        return plan[0] if plan else planner.eos

    def _current(self, matcher: Any, remaining: int) -> list[int] | None:
        """The plan from the matcher's state; None while it is unknown and the budget far away."""
        if self._verify:
            self._verify = False
            assert self._plan is not None
            if not self._planner.completes(matcher, self._plan):
                self._stale_len, self._since, self._plan = len(self._plan), 1, None
        if self._plan is not None:
            return self._plan
        upper = self._stale_len + self._since
        margin = self._shared.margin
        if remaining > 2 * upper + margin + 1 or self._since < self._retry_at:
            return None
        self._overrun = False
        self._plan = self._planner.plan(matcher, 2 * remaining + margin, self._classes)
        if self._plan is None:  # no completion found: try again a few tokens later
            self._retry_at = self._since + RETRY_AFTER
            return None
        if self._since == 1:  # the plan broke on the last token: that token's growth
            self._shared.observe_growth(len(self._plan) - self._stale_len + 1)
        self._since = self._retry_at = 0
        return self._plan


class GrammarBudget:
    """What the budget logic shares between all requests of one compiled grammar: the planner, the byte
    classes its searches learn, and the grammar's shortest complete output from the start.

    The quick (greedy) completion length is computed once when the grammar is compiled; the search for
    the shortest one runs only for a request whose budget is below the quick length. Thread-safe."""

    def __init__(self, planner: ClosingPlanner, matcher: Any, kind: str) -> None:
        self.planner = planner
        self.classes = ByteClasses()
        self.kind = kind
        """What the grammar's output is, for messages ("JSON object", "tool call", ...)."""
        self._pristine = matcher
        quick = planner.plan(matcher, MAX_MIN_LEN, self.classes)
        self.quick_len = None if quick is None else len(quick)
        """Tokens of a complete output found quickly (None: none found)."""
        self.margin = max(ZONE, (self.quick_len or 0) + 2)
        """M: how far beyond twice its plan's length a request's tokens are checked (module docstring)."""
        self._min_len: int | None = None
        self._lock = threading.Lock()

    def guard(self) -> BudgetGuard:
        """The budget guard of a new request at the grammar's start."""
        return BudgetGuard(self)

    def observe_growth(self, growth: int) -> None:
        """A token made a request's closing plan `growth` tokens longer: widen the margin to twice that."""
        if 2 * growth > self.margin:
            self.margin = 2 * growth  # a plain int store: racing guards at worst keep the smaller value

    def min_len(self) -> int | None:
        """Tokens of the shortest complete output found (searched once, then cached; None: none found)."""
        with self._lock:
            if self._min_len is None:
                found = self.planner.shortest(self._pristine, self.quick_len or MAX_MIN_LEN, self.classes)
                self._min_len = None if found is None else len(found)
            return self._min_len

    def check(self, max_tokens: int, room: int | None) -> None:
        """Refuse a request whose budget cannot hold the grammar's shortest complete output. `room`:
        context tokens left after the prompt (None: not known). Raises `InvalidRequestError` naming
        max_tokens (param "max_tokens")."""
        budget = max_tokens if room is None else min(max_tokens, room)
        if self.quick_len is not None and budget >= self.quick_len:
            return
        min_len = self.min_len()
        if min_len is None or budget >= min_len:
            return
        if max_tokens < min_len:
            raise InvalidRequestError(
                f"max_tokens={max_tokens} is too small for a complete {self.kind}: the shortest is {min_len} "
                f"tokens; set max_tokens to at least {min_len}",
                param="max_tokens",
            )
        raise InvalidRequestError(
            f"the prompt leaves {room} tokens of context, fewer than the {min_len} tokens of the shortest "
            f"complete {self.kind}; shorten the prompt",
            param="max_tokens",
        )
