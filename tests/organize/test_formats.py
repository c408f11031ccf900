"""The shared prompt formats: exact builder strings and parser behaviour on well-formed and broken text."""

from __future__ import annotations

import pytest

from terse.errors import InvalidRequestError, TerseError
from terse.organize.formats import (
    ORGANIZE_SYSTEM,
    QA_SYSTEM,
    PlanError,
    PlanStep,
    check_plan,
    fill_answers,
    format_plan,
    format_skeleton,
    parse_plan,
    parse_skeleton,
    plan_messages,
    point_messages,
    qa_messages,
    skeleton_messages,
    synthesis_messages,
)

DOCS = [("doc-1", "Alice works at Acme."), ("doc-2", "Acme is based in Paris.")]


# -- builders ----------------------------------------------------------------------------------------
def test_qa_messages_put_documents_first_and_question_last() -> None:
    msgs = qa_messages("Where does Alice work?", DOCS)
    assert msgs[0] == {"role": "system", "content": QA_SYSTEM}
    assert QA_SYSTEM == "Answer the question using only the documents. Reply with the answer only."
    assert msgs[1] == {
        "role": "user",
        "content": "Documents:\n[doc-1] Alice works at Acme.\n\n[doc-2] Acme is based in Paris.\n\n"
        "Question: Where does Alice work?",
    }


def test_qa_messages_without_documents_and_custom_system() -> None:
    msgs = qa_messages("Why?", [], system="Be terse.")
    assert msgs == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Question: Why?"}]


def test_empty_question_is_a_typed_error() -> None:
    with pytest.raises(InvalidRequestError, match="question is empty"):
        qa_messages("  ", DOCS)


def test_skeleton_messages_end_with_the_instruction() -> None:
    msgs = skeleton_messages("How to bake bread?")
    assert msgs[0]["content"] == ORGANIZE_SYSTEM
    assert msgs[1]["content"] == (
        "Question: How to bake bread?\n\n"
        "Write a skeleton of the answer: 2 to 10 short numbered points, one per line."
    )


def test_point_messages_share_prefix_and_differ_only_at_the_end() -> None:
    points = ["Mix flour", "Knead", "Bake"]
    users = [point_messages("How?", DOCS, points, i)[1]["content"] for i in range(3)]
    prefix = (
        "Documents:\n[doc-1] Alice works at Acme.\n\n[doc-2] Acme is based in Paris.\n\nQuestion: How?\n\n"
        "Skeleton:\n1. Mix flour\n2. Knead\n3. Bake\n\n"
    )
    assert users == [prefix + f"Expand point {n} in one sentence." for n in (1, 2, 3)]


@pytest.mark.parametrize("index", [-1, 3])
def test_point_index_out_of_range(index: int) -> None:
    with pytest.raises(InvalidRequestError, match=r"0-based index in \[0, 2\]"):
        point_messages("How?", (), ["a", "b", "c"], index)


def test_plan_messages_end_with_the_instruction() -> None:
    user = plan_messages("Where is Alice's employer based?", DOCS)[1]["content"]
    assert user.endswith(
        "Question: Where is Alice's employer based?\n\nPlan the answer as sub-questions, one per line as "
        "'Qn: text' with ' [after Qi, Qj]' for dependencies. Refer to an earlier answer as {Qi}."
    )


def test_synthesis_messages_list_sub_answers_with_placeholders_filled() -> None:
    steps = [PlanStep(1, "Where does Alice work?", ()), PlanStep(2, "Where is {Q1} based?", (1,))]
    msgs = synthesis_messages("Where is Alice's employer?", DOCS, [(steps[0], " Acme"), (steps[1], "Paris")])
    assert msgs[0]["content"] == QA_SYSTEM
    assert msgs[1]["content"].endswith(
        "[doc-2] Acme is based in Paris.\n\nSub-answers:\nQ1: Where does Alice work? -> Acme\n"
        "Q2: Where is Acme based? -> Paris\n\nQuestion: Where is Alice's employer?"
    )


# -- parse_skeleton ------------------------------------------------------------------------------------
def test_parse_well_formed_skeleton_round_trips() -> None:
    points = ["Preheat the oven", "Mix the dough", "Bake for 30 minutes"]
    assert parse_skeleton(format_skeleton(points)) == points


@pytest.mark.parametrize(
    "text",
    [
        "1) Alpha\n2) Beta\n3) Gamma",
        "- Alpha\n- Beta\n- Gamma",
        "* Alpha\n* Beta\n* Gamma",
        "(1) Alpha\n(2) Beta\n(3) Gamma",
        "Point 1: Alpha\nPoint 2: Beta\nPoint 3: Gamma",
        "  1.  **Alpha**  \n2. Beta\n\n3. Gamma\n",
    ],
)
def test_parse_skeleton_numbering_styles(text: str) -> None:
    assert parse_skeleton(text) == ["Alpha", "Beta", "Gamma"]


def test_parse_skeleton_ignores_chatter_and_sub_bullets() -> None:
    text = "Sure! Here is the skeleton:\n\n1. Alpha\n   - detail of alpha\n2. Beta\nHope this helps."
    assert parse_skeleton(text) == ["Alpha", "Beta"]


def test_parse_skeleton_orders_out_of_order_numbers() -> None:
    assert parse_skeleton("1. Alpha\n3. Gamma\n2. Beta") == ["Alpha", "Beta", "Gamma"]


def test_parse_skeleton_stops_at_a_repeated_list() -> None:
    assert parse_skeleton("1. Alpha\n2. Beta\n3. Gamma\n1. Alpha\n2. Beta") == ["Alpha", "Beta", "Gamma"]


def test_parse_skeleton_drops_repeated_and_empty_texts() -> None:
    assert parse_skeleton("1. Alpha\n2. alpha\n3. Beta\n4. **Beta**") == ["Alpha", "Beta"]


def test_parse_skeleton_cuts_to_max_points() -> None:
    text = "\n".join(f"{i}. point {i}" for i in range(1, 15))
    assert parse_skeleton(text) == [f"point {i}" for i in range(1, 11)]
    assert parse_skeleton(text, max_points=3) == ["point 1", "point 2", "point 3"]


@pytest.mark.parametrize(
    "text",
    ["", "The answer is 42.", "1. Only one point", "1.5 million people live there.\n2.5 more do not.", "-\n-"],
)
def test_parse_skeleton_malformed_is_none(text: str) -> None:
    assert parse_skeleton(text) is None


# -- parse_plan ------------------------------------------------------------------------------------------
def test_parse_plan_well_formed() -> None:
    text = "Q1: Which company does Alice Moreau work for?\nQ2: In which city is {Q1} based? [after Q1]"
    assert parse_plan(text) == [
        PlanStep(1, "Which company does Alice Moreau work for?", ()),
        PlanStep(2, "In which city is {Q1} based?", (1,)),
    ]


def test_parse_plan_round_trips_through_format_plan() -> None:
    steps = [PlanStep(1, "A?", ()), PlanStep(2, "B?", ()), PlanStep(3, "C of {Q1} and {Q2}?", (1, 2))]
    assert format_plan(steps) == "Q1: A?\nQ2: B?\nQ3: C of {Q1} and {Q2}? [after Q1, Q2]"
    assert parse_plan(format_plan(steps)) == steps


def test_parse_plan_takes_dependencies_from_placeholders_and_ignores_chatter() -> None:
    text = "Here is my plan.\nq1) Who founded Globex?\nQ2. When was {Q1} born?\nThat is all."
    assert parse_plan(text) == [PlanStep(1, "Who founded Globex?", ()), PlanStep(2, "When was {Q1} born?", (1,))]


def test_parse_plan_accepts_out_of_order_ids_when_acyclic() -> None:
    plan = parse_plan("Q2: B of {Q1}?\nQ1: A?")
    assert plan == [PlanStep(2, "B of {Q1}?", (1,)), PlanStep(1, "A?", ())]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I will just answer: Paris.",
        "Q1: A? [after Q2]\nQ2: B? [after Q1]",  # cycle
        "Q1: A of {Q1}?",  # self-reference
        "Q1: A?\nQ2: B? [after Q3]",  # dangling [after]
        "Q1: A?\nQ2: B of {Q5}?",  # dangling placeholder
        "Q1: A?\nQ1: B?",  # repeated id
        "Q1:\nQ2: ",  # no text
        "\n".join(f"Q{i}: step {i}?" for i in range(1, 12)),  # too many steps
    ],
)
def test_parse_plan_broken_is_none(text: str) -> None:
    assert parse_plan(text) is None


def test_check_plan_names_the_problem() -> None:
    with pytest.raises(PlanError, match=r"cycle Q1 -> Q2 -> Q3 -> Q1"):
        check_plan([PlanStep(1, "a", (2,)), PlanStep(2, "b", (3,)), PlanStep(3, "c", (1,))])
    with pytest.raises(PlanError, match=r"Q2 depends on \['Q9'\]"):
        check_plan([PlanStep(1, "a", ()), PlanStep(2, "b", (9,))])
    with pytest.raises(PlanError, match=r"repeats step ids \[1\]"):
        check_plan([PlanStep(1, "a", ()), PlanStep(1, "b", ())])
    with pytest.raises(TerseError, match="1 to 10"):
        check_plan([])


def test_fill_answers() -> None:
    assert fill_answers("Where is {Q1} near {Q2}?", {1: " Acme ", 2: "Paris"}) == "Where is Acme near Paris?"
    with pytest.raises(PlanError, match=r"'\{Q3\}' has no answer yet"):
        fill_answers("What is {Q3}?", {1: "x"})
