"""`parse_layout`: documents found where apps put them; everything else rendered back byte for byte."""

from __future__ import annotations

import json

import pytest

from terse.compress.layouts import JsonLayout, Layout, TextLayout, parse_layout

DOC = (
    "Nils Giroani founded Vasoora Works in 1958 in the town of Kelmar. The morning light fell across the old "
    "stone square while the market stalls opened one by one. Most buildings in the centre were renovated."
)
OTHER = (
    "Dalia Drelmielli is a chemist at Bunient Labs and was born in 1982. Trains to the coast leave every hour, "
    "although the timetable changes during the holidays. A small museum near the station keeps old maps."
)


def texts(layout: Layout) -> list[str]:
    return [d.text for d in layout.documents]


def check_roundtrip(layout: Layout) -> None:
    """Rendering the documents unchanged gives the text back exactly; each span holds its document."""
    assert layout.render(texts(layout)) == layout.text
    for doc in layout.documents:
        raw = layout.text[doc.span.start : doc.span.end]
        assert (json.loads(f'"{raw}"') if isinstance(layout, JsonLayout) else raw) == doc.text


def test_xml_tags_with_metadata_children_and_a_content_child() -> None:
    text = (
        "Answer using the documents.\n<documents>\n"
        f'<document id="a">\n<title>Nils</title>\n{DOC}\n</document>\n'
        f'<document index="2"><source>report.pdf</source><document_content>{OTHER}</document_content></document>\n'
        "</documents>\nWho founded Vasoora Works?"
    )
    layout = parse_layout(text)
    assert layout.kind == "tags" and texts(layout) == [DOC, OTHER]
    assert [d.label for d in layout.documents] == ['<document id="a">', '<document index="2">']
    check_roundtrip(layout)
    assert layout.render(["SHORT", ""]) == (
        'Answer using the documents.\n<documents>\n<document id="a">\n<title>Nils</title>\nSHORT\n</document>\n'
        "</documents>\nWho founded Vasoora Works?"
    )
    assert layout.verbatim_text() == "Answer using the documents.\n<documents>\n</documents>\nWho founded Vasoora Works?"


def test_container_tag_split_into_passages() -> None:
    layout = parse_layout(f"<context>\n{DOC}\n\n{OTHER}\n</context>\n\nQuestion: who?")
    assert layout.kind == "tags" and texts(layout) == [DOC, OTHER]
    check_roundtrip(layout)
    assert layout.render(["", ""]).endswith("</context>\n\nQuestion: who?")  # the closing tag stays


@pytest.mark.parametrize("label", ["Documents:", "Context:", "## Sources", "**Context:**", "Search results:"])
def test_labelled_section_with_numbered_sources_up_to_the_question(label: str) -> None:
    text = f"{label}\n[doc-1] Nils\n{DOC}\n\n[doc-2] {OTHER}\n\nQuestion: Who founded Vasoora Works?"
    layout = parse_layout(text)
    assert layout.kind == "sections"
    assert texts(layout) == [f"Nils\n{DOC}", OTHER] and [d.label for d in layout.documents] == ["[doc-1]", "[doc-2]"]
    check_roundtrip(layout)
    assert layout.render(["", OTHER]) == f"{label}\n[doc-2] {OTHER}\n\nQuestion: Who founded Vasoora Works?"
    assert layout.verbatim_text().endswith("Question: Who founded Vasoora Works?")


def test_context_on_the_label_line_and_an_instruction_that_is_not_a_context() -> None:
    layout = parse_layout(f"Context: {DOC}\nQuestion: when?")
    assert layout.kind == "sections" and texts(layout) == [DOC]
    instruction = "Context: you are the support assistant of ACME and must always be polite to customers."
    assert parse_layout(f"{instruction}\nQuestion: when?").kind == "none"


@pytest.mark.parametrize("marker", ["[1]", "Source 1:", "Document 1.", "[Source 1]"])
def test_numbered_sources_end_before_the_question(marker: str) -> None:
    second = marker.replace("1", "2")
    text = f"Use these sources.\n\n{marker} {DOC}\n\n{second} {OTHER}\n\nWhat year was Vasoora Works founded?"
    layout = parse_layout(text)
    assert layout.kind == "numbered" and texts(layout) == [DOC, OTHER]
    check_roundtrip(layout)
    assert layout.verbatim_text().startswith("Use these sources.")
    assert layout.verbatim_text().endswith("What year was Vasoora Works founded?")


def test_markdown_headings_skip_instruction_sections() -> None:
    text = f"Here are the documents.\n\n## Nils Giroani\n{DOC}\n\n## Dalia\n{OTHER}\n\n## Instructions\nBe brief."
    layout = parse_layout(text)
    assert layout.kind == "headings" and texts(layout) == [DOC, OTHER]
    assert [d.label for d in layout.documents] == ["Nils Giroani", "Dalia"]
    check_roundtrip(layout)
    assert layout.verbatim_text() == "Here are the documents.\n\n## Instructions\nBe brief."


def test_blank_line_passages_beside_an_instruction() -> None:
    text = f"You are a helpful assistant. Answer from the passages below.\n\n{DOC}\n\n{OTHER}"
    layout = parse_layout(text)
    assert layout.kind == "passages" and texts(layout) == [DOC, OTHER]
    check_roundtrip(layout)
    assert layout.verbatim_text().strip() == "You are a helpful assistant. Answer from the passages below."


def test_unrecognised_text_stays_verbatim_unless_the_caller_allows_whole() -> None:
    instructions = "You are a helpful assistant for the billing team and you always answer in English. " * 5
    for text in (instructions, DOC, "", "   ", "Hello?"):
        layout = parse_layout(text)
        assert isinstance(layout, TextLayout) and layout.kind == "none" and not layout.documents
        assert layout.render([]) == text
    whole = parse_layout(f"  {DOC}\n", whole_fallback=True)
    assert whole.kind == "whole" and texts(whole) == [DOC]
    assert whole.render([""]) == ""


def test_json_tool_output_keeps_every_other_byte_and_stays_valid() -> None:
    results = [
        {"id": "d1", "title": "Nils", "score": 1.50, "text": DOC},
        {"id": "d2", "title": "Dalia", "score": 1e3, "text": OTHER},
        {"id": "d3", "title": "Nils again", "text": DOC + " é 北京"},
    ]
    for raw in (json.dumps(results, indent=2), json.dumps(results), json.dumps({"results": results}, ensure_ascii=False)):
        raw = raw.replace("1000.0", "1e3")  # a number as a tool may write it: must survive as written
        layout = parse_layout(raw)
        assert isinstance(layout, JsonLayout) and texts(layout) == [DOC, OTHER, DOC + " é 北京"]
        assert [d.label for d in layout.documents] == ["d1", "d2", "d3"]
        check_roundtrip(layout)
        for kept in ([DOC, "", ""], ["", OTHER, ""], ["", "", "x"], ["", "", ""], ["a \"quoted\"\nline", "", "b"]):
            rendered = layout.render(kept)
            value = json.loads(rendered)  # always valid JSON
            items = value["results"] if isinstance(value, dict) else value
            assert [item["text"] for item in items] == [k for k in kept if k]
            assert "1e3" in rendered or not kept[1]


def test_json_strings_in_arrays_and_fields_outside_arrays() -> None:
    layout = parse_layout(json.dumps({"query": "who?", "passages": [DOC, OTHER], "summary": OTHER}))
    assert texts(layout) == [DOC, OTHER, OTHER]
    value = json.loads(layout.render(["", "kept", ""]))
    assert value == {"query": "who?", "passages": ["kept"], "summary": ""}


@pytest.mark.parametrize("raw", ["[1, 2, 3]", '{"a": 1}', "[" * 5000 + "]" * 5000, '{"text": "short"}', "[{]"])
def test_json_without_documents_or_broken_is_not_a_layout(raw: str) -> None:
    layout = parse_layout(raw)
    assert layout.kind == "none" and layout.render([]) == raw


def test_cjk_and_mixed_language_documents() -> None:
    zh = "北京是中国的首都，一九五八年建成了这座大楼。" * 8
    ja = "東京は日本の首都です。一千五百万人が住んでいます。" * 8
    text = f"请根据以下文档回答问题。\n\n[1] {zh}\n\n[2] {ja}\n\n[3] {DOC}\n\n问题：大楼是哪一年建成的？"
    layout = parse_layout(text)
    assert layout.kind == "numbered" and texts(layout)[:2] == [zh, ja]
    check_roundtrip(layout)
    assert "问题" in layout.verbatim_text()
