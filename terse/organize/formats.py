"""The prompt formats of document QA, Skeleton-of-Thought and DAG planning, and their parsers.

These exact strings are what the reference model is trained on, so they change only in backwards-
compatible ways. Every builder returns chat messages (render them with `Backend.render_chat`); every
parser is pure and total: it returns None (or raises `PlanError` where documented) on text that does
not parse, never a half-parsed result.

Layout of a user turn (documents first and the question last, so that many questions over the same
documents, and every expansion of one skeleton, share the longest possible prefix):

    Documents:
    [doc-1] text one

    [doc-2] text two

    Question: <question>

    <instruction of the step>          (skeleton / point / plan only)

Without documents the user turn starts at "Question: ".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from terse.backend.types import Message
from terse.errors import InvalidRequestError, TerseError

QA_SYSTEM = "Answer the question using only the documents. Reply with the answer only."
"""System prompt of document QA, sub-question answers and DAG synthesis: the reply is the bare answer."""

ORGANIZE_SYSTEM = "Answer the question. Be brief and follow the instruction exactly."
"""System prompt of the skeleton, point-expansion and plan steps."""

SKELETON_INSTRUCTION = "Write a skeleton of the answer: 2 to 10 short numbered points, one per line."
POINT_INSTRUCTION = "Expand point {number} in one sentence."
PLAN_INSTRUCTION = (
    "Plan the answer as sub-questions, one per line as 'Qn: text' with ' [after Qi, Qj]' for "
    "dependencies. Refer to an earlier answer as {Qi}."
)

MIN_SKELETON_POINTS = 2
MAX_SKELETON_POINTS = 10
MAX_PLAN_STEPS = 10

Context = tuple[str, str]
"""One document as (doc_id, text)."""


class PlanError(TerseError, ValueError):
    """A DAG plan is not usable: duplicate step ids, a reference to a missing step, or a cycle."""


# -- document QA -----------------------------------------------------------------------------------
def _documents_and_question(question: str, contexts: Sequence[Context]) -> str:
    if not question.strip():
        raise InvalidRequestError("question is empty; pass the text of the question to answer")
    docs = "\n\n".join(f"[{doc_id}] {text}" for doc_id, text in contexts)
    head = f"Documents:\n{docs}\n\n" if contexts else ""
    return f"{head}Question: {question}"


def qa_messages(question: str, contexts: Sequence[Context], system: str = QA_SYSTEM) -> list[Message]:
    """Messages asking `question` over `contexts`; the assistant replies with the bare answer."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": _documents_and_question(question, contexts)},
    ]


# -- Skeleton-of-Thought -----------------------------------------------------------------------------
def skeleton_messages(question: str, contexts: Sequence[Context] = ()) -> list[Message]:
    """Messages asking for a skeleton; the assistant replies "1. ...\\n2. ...", parsed by `parse_skeleton`."""
    user = f"{_documents_and_question(question, contexts)}\n\n{SKELETON_INSTRUCTION}"
    return [{"role": "system", "content": ORGANIZE_SYSTEM}, {"role": "user", "content": user}]


def format_skeleton(points: Sequence[str]) -> str:
    """The canonical skeleton text "1. a\\n2. b" (the assistant's skeleton reply, and inside point prompts)."""
    return "\n".join(f"{i}. {p}" for i, p in enumerate(points, start=1))


def point_messages(
    question: str, contexts: Sequence[Context], skeleton_points: Sequence[str], index: int
) -> list[Message]:
    """Messages asking to expand `skeleton_points[index]` (0-based; shown as "point index+1").

    All expansions of one skeleton are identical up to the final instruction, so a prefix cache
    prefills the documents, question and skeleton once. The assistant replies with one sentence.
    """
    if not 0 <= index < len(skeleton_points):
        raise InvalidRequestError(
            f"index={index} is outside the skeleton's {len(skeleton_points)} points; "
            f"pass a 0-based index in [0, {len(skeleton_points) - 1}]"
        )
    user = (
        f"{_documents_and_question(question, contexts)}\n\nSkeleton:\n{format_skeleton(skeleton_points)}"
        f"\n\n{POINT_INSTRUCTION.format(number=index + 1)}"
    )
    return [{"role": "system", "content": ORGANIZE_SYSTEM}, {"role": "user", "content": user}]


# A list item: "1." / "1)" / "(1)" / "Point 1:" numbering, or a "-", "*", "•" bullet; then the text.
_NUMBERED = re.compile(r"^\s*(?:\(\s*(\d{1,2})\s*\)|(?:point\s+)?(\d{1,2})\s*[.):])\s+(.*\S)\s*$", re.I)
_BULLET = re.compile(r"^\s*[-*•]\s+(.*\S)\s*$")
_EMPHASIS = re.compile(r"^\*\*(.+)\*\*$")


def _clean_point(text: str) -> str:
    text = text.strip()
    match = _EMPHASIS.match(text)
    return match.group(1).strip() if match else text


def parse_skeleton(
    text: str, *, min_points: int = MIN_SKELETON_POINTS, max_points: int = MAX_SKELETON_POINTS
) -> list[str] | None:
    """The skeleton points in `text`, or None when fewer than `min_points` parse.

    Rules (each one a failure seen in model output):
    - Lines that are not list items ("Here is the skeleton:") are chatter and ignored.
    - Numbered items ("1.", "1)", "(1)", "Point 1:") win over bullets ("- ", "* "): when any numbered
      item exists, bullet lines are taken for sub-points and ignored.
    - A number seen before starts a repeated list (a decoding loop): parsing stops there.
    - Out-of-order numbers are put in numeric order; bullets keep the order they appear in.
    - Empty and repeated point texts (case-insensitive) are dropped.
    - More than `max_points` items are cut to the first `max_points`.
    """
    numbered: list[tuple[int, str]] = []
    bullets: list[str] = []
    seen_numbers: set[int] = set()
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match:
            number = int(match.group(1) or match.group(2))
            if number in seen_numbers:
                break
            seen_numbers.add(number)
            numbered.append((number, _clean_point(match.group(3))))
            continue
        bullet = _BULLET.match(line)
        if bullet:
            bullets.append(_clean_point(bullet.group(1)))
    ordered = [p for _, p in sorted(numbered, key=lambda item: item[0])] if numbered else bullets
    points: list[str] = []
    seen_texts: set[str] = set()
    for point in ordered:
        key = point.casefold()
        if point and key not in seen_texts:
            seen_texts.add(key)
            points.append(point)
    if len(points) < min_points:
        return None
    return points[:max_points]


# -- DAG planning ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanStep:
    """One sub-question of a plan, as written "Q{step_id}: {question} [after Qi, Qj]"."""

    step_id: int
    """The n of "Qn"; unique within a plan."""
    question: str
    """The sub-question, with "{Qi}" placeholders still in it (see `fill_answers`)."""
    dependency_ids: tuple[int, ...]
    """Steps whose answers this one needs: its "[after ...]" list and every "{Qi}" it mentions, sorted."""

    @property
    def label(self) -> str:
        return f"Q{self.step_id}"


_PLAN_LINE = re.compile(r"^\s*Q(\d{1,3})\s*[:.)]\s*(.*?)\s*(?:\[\s*after\s+([^\]]*)\])?\s*$", re.I)
_STEP_REF = re.compile(r"Q(\d{1,3})", re.I)
_PLACEHOLDER = re.compile(r"\{Q(\d{1,3})\}")


def plan_messages(question: str, contexts: Sequence[Context] = ()) -> list[Message]:
    """Messages asking for a plan of sub-questions; the reply is parsed by `parse_plan`."""
    user = f"{_documents_and_question(question, contexts)}\n\n{PLAN_INSTRUCTION}"
    return [{"role": "system", "content": ORGANIZE_SYSTEM}, {"role": "user", "content": user}]


def format_plan(steps: Sequence[PlanStep]) -> str:
    """The canonical plan text (the assistant's plan reply); `parse_plan(format_plan(s)) == s`."""
    lines = []
    for step in steps:
        after = f" [after {', '.join(f'Q{i}' for i in step.dependency_ids)}]" if step.dependency_ids else ""
        lines.append(f"{step.label}: {step.question}{after}")
    return "\n".join(lines)


def check_plan(steps: Sequence[PlanStep], *, max_steps: int = MAX_PLAN_STEPS) -> None:
    """Raise `PlanError` unless `steps` is a usable plan: 1..max_steps steps, unique ids, every
    dependency an existing other step, and no cycle."""
    if not 1 <= len(steps) <= max_steps:
        raise PlanError(f"plan has {len(steps)} steps; a plan needs 1 to {max_steps}")
    ids = [s.step_id for s in steps]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise PlanError(f"plan repeats step ids {dup}; every 'Qn' must be written once")
    known = set(ids)
    for step in steps:
        missing = [d for d in step.dependency_ids if d not in known]
        if missing:
            names = [f"Q{d}" for d in missing]
            raise PlanError(f"{step.label} depends on {names}, which the plan lacks")
    cycle = _find_cycle({s.step_id: s.dependency_ids for s in steps})
    if cycle:
        raise PlanError(f"plan has a dependency cycle {' -> '.join(f'Q{i}' for i in cycle)}")


def _find_cycle(deps: Mapping[int, Sequence[int]]) -> list[int] | None:
    """A cycle in the dependency graph as a closed id path, or None (iterative three-colour DFS)."""
    state: dict[int, int] = {}  # 1 = on the current path, 2 = finished
    for root in deps:
        if state.get(root):
            continue
        path: list[int] = [root]
        iters = [iter(deps[root])]
        state[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(deps[nxt]))
    return None


def parse_plan(text: str, *, max_steps: int = MAX_PLAN_STEPS) -> list[PlanStep] | None:
    """The plan in `text` in written order, or None when no step parses or `check_plan` rejects it.

    Lines that do not start with "Qn:" ("Qn." and "Qn)" are accepted too) are chatter and ignored.
    A step's dependencies are the union of its "[after Qi, Qj]" list and the "{Qi}" placeholders in
    its text; a self-reference, a missing step, a repeated id or a cycle makes the whole plan None.
    """
    steps: list[PlanStep] = []
    for line in text.splitlines():
        match = _PLAN_LINE.match(line)
        if not match or not match.group(2):
            continue
        question = match.group(2)
        after = {int(i) for i in _STEP_REF.findall(match.group(3) or "")}
        placeholders = {int(i) for i in _PLACEHOLDER.findall(question)}
        steps.append(PlanStep(int(match.group(1)), question, tuple(sorted(after | placeholders))))
    try:
        check_plan(steps, max_steps=max_steps)
    except PlanError:
        return None
    return steps


def fill_answers(question: str, answers: Mapping[int, str]) -> str:
    """`question` with every "{Qi}" replaced by `answers[i]`; raise `PlanError` for a missing answer."""

    def replace(match: re.Match[str]) -> str:
        step_id = int(match.group(1))
        if step_id not in answers:
            raise PlanError(f"'{match.group(0)}' has no answer yet; answer Q{step_id} before this step")
        return answers[step_id].strip()

    return _PLACEHOLDER.sub(replace, question)


def synthesis_messages(
    question: str, contexts: Sequence[Context], steps_with_answers: Sequence[tuple[PlanStep, str]]
) -> list[Message]:
    """Messages asking the final answer from the sub-answers; the assistant replies the bare answer.

    Each sub-question is shown as it was asked (placeholders filled): "Q1: <sub-question> -> <answer>".
    """
    answers = {step.step_id: answer for step, answer in steps_with_answers}
    lines = [
        f"{step.label}: {fill_answers(step.question, answers)} -> {answer.strip()}"
        for step, answer in steps_with_answers
    ]
    docs = "\n\n".join(f"[{doc_id}] {text}" for doc_id, text in contexts)
    head = f"Documents:\n{docs}\n\n" if contexts else ""
    if not question.strip():
        raise InvalidRequestError("question is empty; pass the text of the question to answer")
    user = f"{head}Sub-answers:\n" + "\n".join(lines) + f"\n\nQuestion: {question}"
    return [{"role": "system", "content": QA_SYSTEM}, {"role": "user", "content": user}]
