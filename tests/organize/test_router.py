"""Routing between Skeleton-of-Thought and a direct answer."""

from __future__ import annotations

import pytest

from terse.backend.base import Backend
from terse.errors import ConfigError, UnsupportedOperationError
from terse.organize.router import FixedRouter, ModelRouter, Route, RuleRouter, make_router


@pytest.mark.parametrize(
    "question",
    [
        "What are the steps to bake sourdough bread?",
        "Give me some ways to reduce cloud costs.",
        "Which products does Acme sell?",
        "List the main features of the engine.",
        "What are the pros and cons of remote work?",
        "How can I improve my sleep?",
        "Name three reasons to learn Rust.",
    ],
)
def test_rules_send_list_like_questions_to_sot(question: str) -> None:
    route = RuleRouter().route(question)
    assert route.mode == "sot", route
    assert route.reason.startswith("rule: ")


@pytest.mark.parametrize(
    "question",
    [
        "Who founded Globex?",
        "When was Alice born?",
        "How many employees does Acme have?",
        "Calculate the list price after three discounts.",  # calculation beats 'list'
        "Write a function that lists the steps.",  # one coherent text beats 'steps'
        "Is Paris in France?",
    ],
)
def test_rules_send_single_answers_direct(question: str) -> None:
    assert RuleRouter().route(question).mode == "direct"


def test_registry_and_fixed_router(hf_backend: Backend) -> None:
    assert isinstance(make_router("rules", hf_backend), RuleRouter)
    assert make_router("always-sot", hf_backend).route("Who?").mode == "sot"
    assert FixedRouter("direct").route("List ways").mode == "direct"
    with pytest.raises(ConfigError, match="router='magic' is unknown"):
        make_router("magic", hf_backend)


def test_model_router_compares_yes_and_no_logprobs(hf_backend: Backend) -> None:
    router = ModelRouter(hf_backend)
    question = "What are the steps to bake bread?"
    yes, no = hf_backend.score(["yes", "no"], prefix=hf_backend.render_chat(router.messages(question)))
    route = router.route(question)
    assert route.mode == ("sot" if yes.total_logprob > no.total_logprob else "direct")
    assert route.reason.startswith("model: log P(yes) - log P(no) = ")


def test_rules_route_the_synthetic_benchmark_by_question_kind() -> None:
    from terse.synth.dataset import SplitConfig, build_split

    data = build_split("validation", SplitConfig(num_worlds=1, questions_per_kind=15, needle_lengths=(), needle_depths=()))
    router = RuleRouter()
    routed = {(q.kind, router.route(q.question).mode) for q in data.questions}
    assert routed == {("list", "sot"), ("single", "direct"), ("multi", "direct")}


class _CannotScore:
    """A backend without log-probabilities (an OpenAI-compatible server that returns none)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def render_chat(self, messages: list) -> str:  # type: ignore[type-arg]
        return self.inner.render_chat(messages)

    def score(self, texts: list, *, prefix: str = "") -> list:  # type: ignore[type-arg]
        raise UnsupportedOperationError("no logprobs")


def test_model_router_falls_back_to_rules_without_logprobs(hf_backend: Backend) -> None:
    route = ModelRouter(_CannotScore(hf_backend)).route("What are the steps to bake bread?")  # type: ignore[arg-type]
    assert route == Route("sot", "model cannot score; rule: asks for steps")
