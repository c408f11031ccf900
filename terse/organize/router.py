"""Routers decide whether a question is answered by Skeleton-of-Thought or directly.

Skeleton-of-Thought pays off when the answer is a list of independent points ("What are the steps
to...", "Which products..."); for a single fact, a calculation or a chain of reasoning it costs an
extra call and can break coherence. Every router returns a `Route` with the reason, so results say
why a mode was used.

Registry: `ROUTERS` maps a name to a factory taking the backend (which rule-based routers ignore).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from terse.backend.base import Backend
from terse.backend.types import Message
from terse.errors import ConfigError, UnsupportedOperationError

Mode = Literal["sot", "direct"]


@dataclass(frozen=True)
class Route:
    """A routing decision."""

    mode: Mode
    """"sot" to expand a skeleton in parallel, "direct" to answer in one generation."""
    reason: str
    """Why, in words (the rule that fired or the model's verdict)."""


class Router(Protocol):
    """Decides the answering mode of one question. Must not mutate anything; may call the backend."""

    def route(self, question: str) -> Route: ...


# Wording that asks for several parallel items. Each pattern is (regex, reason); the first hit wins.
_LIST_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.I), reason)
    for pattern, reason in (
        (r"\b(steps?|stages?|phases?)\b", "asks for steps"),
        (r"\b(ways?|methods?|strategies|tips|techniques|approaches|ideas|options)\b", "asks for ways or options"),
        (r"\b(list|enumerate|name|outline|summari[sz]e)\b", "asks for a list or an outline"),
        (r"\b(which|what)\s+(\w+\s+)?(products|companies|people|cities|countries|items|features|tools)\b",
         "asks which members of a set"),
        (r"\b(pros?\s+and\s+cons?|advantages|disadvantages|benefits|drawbacks|differences|reasons|causes|factors)\b",
         "asks for several reasons or factors"),
        (r"\b(how\s+(do|can|should|to)\s+(i|we|you|one)?\s*\w+)", "asks how to do something"),
        (r"\b(\d+|two|three|four|five|six|seven|eight|nine|ten|several|some|main|key)\s+"
         r"(\w+\s+)?(things|points|examples|reasons|ways|steps|tips|types|kinds)\b", "asks for a counted set"),
    )
)
# Wording of a single fact or a chain of reasoning; checked first, as SoT would fragment these.
_DIRECT_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.I), reason)
    for pattern, reason in (
        (r"\b(calculate|compute|solve|prove|derive|how\s+many|how\s+much)\b", "asks for a calculation or proof"),
        (r"^\s*(who|when|where)\b", "asks for a single fact"),
        (r"\b(yes\s+or\s+no|true\s+or\s+false)\b", "asks a yes/no question"),
        (r"\b(code|function|program|script|translate|rewrite|poem|story)\b", "asks for one coherent text"),
    )
)


class RuleRouter:
    """Keyword rules over the question: direct-answer wording first, then list-like wording, else direct."""

    def route(self, question: str) -> Route:
        for pattern, reason in _DIRECT_RULES:
            if pattern.search(question):
                return Route("direct", f"rule: {reason}")
        for pattern, reason in _LIST_RULES:
            if pattern.search(question):
                return Route("sot", f"rule: {reason}")
        return Route("direct", "rule: no list-like wording")


ROUTER_INSTRUCTION = (
    "Can the answer to this question be written as several independent points, each expandable "
    "on its own? Reply yes or no."
)


class ModelRouter:
    """Asks the model whether the answer splits into independent points, by comparing the
    log-probabilities of " yes" and " no" (`Backend.score`); falls back to `fallback` when the
    backend cannot score."""

    def __init__(self, backend: Backend, fallback: Router | None = None) -> None:
        self.backend = backend
        self.fallback = fallback or RuleRouter()

    def messages(self, question: str) -> list[Message]:
        return [{"role": "user", "content": f"Question: {question}\n\n{ROUTER_INSTRUCTION}"}]

    def route(self, question: str) -> Route:
        prefix = self.backend.render_chat(self.messages(question))
        try:
            yes, no = self.backend.score(["yes", "no"], prefix=prefix)
        except UnsupportedOperationError:
            route = self.fallback.route(question)
            return Route(route.mode, f"model cannot score; {route.reason}")
        margin = yes.total_logprob - no.total_logprob
        mode: Mode = "sot" if margin > 0 else "direct"
        return Route(mode, f"model: log P(yes) - log P(no) = {margin:.2f}")


class FixedRouter:
    """Always the same mode (benchmarks, and callers that already know)."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode

    def route(self, question: str) -> Route:
        return Route(self.mode, f"fixed: {self.mode}")


ROUTERS: dict[str, Callable[[Backend], Router]] = {
    "rules": lambda backend: RuleRouter(),
    "model": lambda backend: ModelRouter(backend),
    "always-sot": lambda backend: FixedRouter("sot"),
    "always-direct": lambda backend: FixedRouter("direct"),
}


def make_router(name: str, backend: Backend) -> Router:
    """The router registered under `name`; `ConfigError` naming the known ones otherwise."""
    if name not in ROUTERS:
        raise ConfigError(f"router={name!r} is unknown; choose one of {sorted(ROUTERS)}")
    return ROUTERS[name](backend)

