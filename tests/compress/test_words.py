"""Word and sentence segmentation, and joining kept words."""

from __future__ import annotations

from terse.compress.words import join_words, sentence_ids, split_words


def _texts(text: str) -> list[str]:
    return [text[a:b] for a, b in split_words(text)]


def test_words_are_maximal_non_space_runs() -> None:
    assert _texts("  Hello,  world.\n\tx=3.14;  ") == ["Hello,", "world.", "x=3.14;"]
    assert _texts("") == []
    assert _texts(" \n\t ") == []


def test_cjk_runs_are_segmented_into_words_and_accents_stay_whole() -> None:
    assert _texts("北京大学成立于一九五八年，有一千五百万人。") == [
        "北京大学", "成立", "于", "一九五八年", "，", "有", "一千五百万", "人", "。"]
    assert _texts("東京は日本の首都です。") == ["東京", "は", "日本", "の", "首都", "です", "。"]
    assert _texts("élèves à l'université") == ["élèves", "à", "l'université"]
    assert _texts("Tokyo東京 café 2019年5月1日") == ["Tokyo", "東京", "café", "2019年", "5月", "1日"]
    assert _texts("Привет, мир!") == ["Привет,", "мир!"]


def test_cjk_fallback_never_cuts_single_characters_of_a_word() -> None:
    from terse.compress.segment import fallback_segments

    text = "北京大学ですカタカナ。"
    assert [text[a:b] for a, b in fallback_segments(text)] == ["北京大学", "です", "カタカナ", "。"]


def test_sentences_end_at_terminal_punctuation_and_line_breaks() -> None:
    text = "One two. Three four!\nFive six 3.14 seven。八九"
    words = split_words(text)
    assert sentence_ids(text, words) == [0, 0, 1, 1, 2, 2, 2, 2, 2, 3]


def test_join_keeps_neighbour_whitespace_and_marks_gaps() -> None:
    text = "def f(x):\n    return x\n\nprint(f(2)) and more words"
    words = split_words(text)
    joined, spans = join_words(text, words, [0, 1, 2, 3, 4])
    assert joined == "def f(x):\n    return x\n\nprint(f(2))"
    assert [joined[a:b] for a, b in spans] == [text[a:b] for a, b in words[:5]]
    joined, _ = join_words(text, words, [0, 2, 5, 7])
    assert joined == "def\nreturn\nand words"  # a newline inside a deleted stretch stays a newline
    cjk = "東京は日本の首都です"
    joined, _ = join_words(cjk, split_words(cjk), [0, 2, 4])
    assert joined == "東京日本首都"  # no spaces invented between CJK words
    assert join_words(text, words, []) == ("", [])
