"""terse inside LlamaIndex: the node postprocessor and the index retriever in a real query engine."""

from __future__ import annotations

from pathlib import Path

from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import NodeWithScore, TextNode

from terse.compress.words import split_words
from terse.integrations.llama_index import TerseIndexRetriever, TerseNodePostprocessor
from tests.integrations.conftest import DOCS, QUESTION


def nodes() -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(id_=name, text=text, metadata={"source": f"{name}.txt"}), score=1.0 / (i + 1))
        for i, (name, text) in enumerate(DOCS.items())
    ]


def test_postprocessor_compresses_nodes_keeping_ids_metadata_and_scores() -> None:
    given = nodes()
    out = TerseNodePostprocessor(target_tokens=40).postprocess_nodes(given, query_str=QUESTION)
    assert out[0].node.node_id == "alice" and "Acme Corp" in out[0].node.get_content()
    assert out[0].node.metadata == {"source": "alice.txt"}
    assert out[0].score == next(n.score for n in given if n.node.node_id == "alice")
    assert sum(len(split_words(n.node.get_content())) for n in out) <= 40
    assert given[1].node.get_content() == DOCS["alice"]  # the input nodes are not modified


def test_index_retriever_and_postprocessor_in_a_query_engine(saved_index: Path) -> None:
    retriever = TerseIndexRetriever(str(saved_index), k=4)
    found = retriever.retrieve(QUESTION)
    assert found[0].node.metadata["doc_id"] == "alice" and found[0].score is not None
    engine = RetrieverQueryEngine.from_args(
        retriever, node_postprocessors=[TerseNodePostprocessor(rate=0.5)], llm=MockLLM(max_tokens=4)
    )
    response = engine.query(QUESTION)
    sources = response.source_nodes
    assert sources[0].node.metadata["doc_id"] == "alice" and "Acme" in sources[0].node.get_content()
    total = sum(len(split_words(n.node.get_content())) for n in found)
    assert sum(len(split_words(n.node.get_content())) for n in sources) < total
