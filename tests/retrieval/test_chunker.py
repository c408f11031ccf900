"""Chunk boundaries, budgets, overlap and exact offsets on crafted text."""

from __future__ import annotations

import pytest

from terse.errors import ConfigError
from terse.retrieval import ChunkerConfig, Document, Retriever, RetrieverConfig
from terse.retrieval.chunker import Chunker, RegexTokenizer, split_sentences
from terse.retrieval.types import Chunk

UNICODE_TEXT = (
    "Ça commence ici. Zoë’s café serves crème brûlée! Does it?\n\n"
    "# Überschrift mit Umlauten\n"
    "- first item 🚀 with emoji\n"
    "- second item\n\n"
    "東京は日本の首都です。大阪は大きい都市です！本当ですか？\n"
    "Ends without a period"
)


def _check_exact(doc: Document, chunks: list[Chunk], budget: int, tokenizer: object) -> None:
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert doc.text[chunk.char_start : chunk.char_end] == chunk.text
        assert chunk.text == chunk.text.strip() and chunk.text
        assert 0 < chunk.num_tokens <= budget
        assert len(tokenizer.token_offsets(chunk.text)) == chunk.num_tokens  # type: ignore[attr-defined]
    covered = set()
    for chunk in chunks:
        covered.update(range(chunk.char_start, chunk.char_end))
    assert all(i in covered for i, ch in enumerate(doc.text) if not ch.isspace())


def test_sentence_split_handles_unicode_markdown_and_cjk() -> None:
    sentences = [UNICODE_TEXT[s:e] for s, e in split_sentences(UNICODE_TEXT)]
    assert sentences == [
        "Ça commence ici.",
        "Zoë’s café serves crème brûlée!",
        "Does it?",
        "# Überschrift mit Umlauten",
        "- first item 🚀 with emoji",
        "- second item",
        "東京は日本の首都です。",
        "大阪は大きい都市です！",
        "本当ですか？",
        "Ends without a period",
    ]


@pytest.mark.parametrize("budget,overlap", [(8, 0), (12, 3), (40, 10), (400, 0)])
def test_offsets_exact_and_within_budget(budget: int, overlap: int) -> None:
    tokenizer = RegexTokenizer()
    doc = Document("u", UNICODE_TEXT * 3)
    chunks = Chunker(ChunkerConfig(budget, overlap), tokenizer).chunk(doc)
    _check_exact(doc, chunks, budget, tokenizer)
    if budget == 400:
        assert len(chunks) == 1 and chunks[0].char_start == 0 and chunks[0].char_end == len(doc.text)


def test_overlap_repeats_trailing_sentences() -> None:
    sentences = [f"Sentence number {i} is here." for i in range(20)]  # 6 tokens each
    chunks = Chunker(ChunkerConfig(30, 12), RegexTokenizer()).chunk(Document("o", " ".join(sentences)))
    # 5 sentences fill 30 tokens; the last 2 (12 tokens) open the next chunk: stride 3 sentences
    expected = [" ".join(sentences[i : i + 5]) for i in range(0, 16, 3)]
    assert [c.text for c in chunks] == expected
    assert all(c.num_tokens == 30 for c in chunks)


def test_empty_and_whitespace_documents_have_no_chunks() -> None:
    chunker = Chunker(ChunkerConfig(16, 2), RegexTokenizer())
    assert chunker.chunk(Document("e", "")) == []
    assert chunker.chunk(Document("w", " \n\n\t  \n")) == []


def test_huge_paragraph_is_cut_at_token_boundaries() -> None:
    words = [f"w{i}" for i in range(1000)]
    text = "  " + " ".join(words)  # one "sentence", no punctuation, leading blanks
    tokenizer = RegexTokenizer()
    chunks = Chunker(ChunkerConfig(64, 16), tokenizer).chunk(Document("h", text))
    _check_exact(Document("h", text), chunks, 64, tokenizer)
    starts = [int(c.text.split()[0][1:]) for c in chunks]
    assert starts == list(range(0, 1000 - 16, 48))  # stride = chunk_tokens - overlap_tokens
    assert chunks[-1].text.endswith("w999")


def test_long_sentence_between_short_ones() -> None:
    text = "Short one. " + " ".join(["long"] * 50) + ". Short two."
    tokenizer = RegexTokenizer()
    chunks = Chunker(ChunkerConfig(20, 4), tokenizer).chunk(Document("m", text))
    _check_exact(Document("m", text), chunks, 20, tokenizer)
    assert chunks[0].text == "Short one."
    assert chunks[-1].text.endswith("Short two.")


def test_real_tokenizer_budget_holds(minilm: object) -> None:
    doc = Document("r", (UNICODE_TEXT + " ") * 20)
    chunks = Chunker(ChunkerConfig(48, 8), minilm).chunk(doc)  # type: ignore[arg-type]
    _check_exact(doc, chunks, 48, minilm)


def test_config_validation_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="overlap_tokens=50"):
        ChunkerConfig(chunk_tokens=100, overlap_tokens=50)
    with pytest.raises(ConfigError, match="chunk_tokens=4"):
        ChunkerConfig(chunk_tokens=4, overlap_tokens=0)


def test_budget_beyond_embedder_window_is_rejected(minilm: object) -> None:
    retriever = Retriever(RetrieverConfig(chunker=ChunkerConfig(chunk_tokens=1000)), embedder=minilm)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="chunk_tokens <= 254"):
        retriever.add_documents([Document("a", "text")])
