"""terse inside LangChain: the compressor and retriever in LangChain's own pipeline classes, and
langchain-openai talking to `terse serve`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from terse.compress.words import split_words
from terse.integrations.langchain import TerseCompressor, TerseRetriever
from tests.integrations.conftest import DOCS, QUESTION


def words(text: str) -> int:
    return len(split_words(text))


def docs() -> list[Document]:
    return [Document(page_content=text, metadata={"source": f"{name}.txt"}, id=name) for name, text in DOCS.items()]


def test_compressor_keeps_metadata_ranks_the_answer_first_and_meets_the_budget() -> None:
    compressor = TerseCompressor(target_tokens=40)  # no scorer, no tokenizer: counted in words
    out = compressor.compress_documents(docs(), QUESTION)
    assert out[0].id == "alice" and "Acme Corp" in out[0].page_content
    assert out[0].metadata["source"] == "alice.txt" and out[0].metadata["terse_rank"] == 0
    assert sum(words(d.page_content) for d in out) <= 40 < sum(words(t) for t in DOCS.values())
    for d in out:  # every kept document is its original's words, in order
        original = DOCS[d.id or ""]
        assert 0 < d.metadata["terse_kept_ratio"] <= 1 and set(d.page_content.split()) <= set(original.split())


def test_compressor_by_rate_and_async() -> None:
    out = asyncio.run(TerseCompressor(rate=0.5).acompress_documents(docs(), QUESTION))
    total = sum(words(t) for t in DOCS.values())
    assert 0 < sum(words(d.page_content) for d in out) <= total // 2 + 1
    assert TerseCompressor().compress_documents([], QUESTION) == []


def test_bad_budgets_name_the_fix() -> None:  # pydantic reports them as its ValidationError (a ValueError)
    with pytest.raises(ValueError, match="not both"):
        TerseCompressor(rate=0.5, target_tokens=10)
    with pytest.raises(ValueError, match="rate=2"):
        TerseCompressor(rate=2)


def test_retriever_and_compressor_inside_contextual_compression_retriever(saved_index: Path) -> None:
    base = TerseRetriever(index=str(saved_index), k=4)
    hits = base.invoke(QUESTION)
    assert hits[0].metadata["doc_id"] == "alice" and hits[0].metadata["score"] > 0
    pipeline = ContextualCompressionRetriever(base_compressor=TerseCompressor(rate=0.5), base_retriever=base)
    compressed = pipeline.invoke(QUESTION)
    assert compressed[0].metadata["doc_id"] == "alice" and "Acme Corp" in compressed[0].page_content
    assert sum(words(d.page_content) for d in compressed) < sum(words(d.page_content) for d in hits)
    bm25 = TerseRetriever(index=str(saved_index), k=1, mode="bm25").invoke("bread flour yeast")
    assert [d.metadata["doc_id"] for d in bm25] == ["recipes"]


def test_langchain_openai_against_terse_serve(terse_server: tuple[str, str, str]) -> None:
    url, model, embedder = terse_server
    llm = ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model=model, max_tokens=6, temperature=0, max_retries=0)
    answer = llm.invoke("Where does Alice work?")
    streamed = "".join(str(chunk.content) for chunk in llm.stream("Where does Alice work?"))
    assert isinstance(answer.content, str) and streamed == answer.content
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] > 0
    with_logprobs = llm.bind(logprobs=True, top_logprobs=2).invoke("Where does Alice work?")
    content = with_logprobs.response_metadata["logprobs"]["content"]
    assert content and len(content[0]["top_logprobs"]) == 2
    embeddings = OpenAIEmbeddings(base_url=f"{url}/v1", api_key="unused", model=embedder,
                                  check_embedding_ctx_length=False)  # send text, not tiktoken ids
    vectors = np.array(embeddings.embed_documents(["Alice works at Acme Corp.", "Bread needs yeast."]))
    assert vectors.shape[0] == 2 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_compressor_counts_in_the_named_tokenizer() -> None:
    from transformers import AutoTokenizer

    reference = str(Path(__file__).resolve().parents[2] / "terse" / "models" / "reference")
    tok = AutoTokenizer.from_pretrained(reference)

    def tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    out = TerseCompressor(target_tokens=40, tokenizer=reference).compress_documents(docs(), QUESTION)
    assert out[0].id == "alice" and "Acme Corp" in out[0].page_content
    assert 0 < sum(tokens(d.page_content) for d in out) <= 40 < sum(tokens(t) for t in DOCS.values())
