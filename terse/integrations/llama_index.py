"""terse in LlamaIndex: `TerseNodePostprocessor` (compresses retrieved nodes) and `TerseIndexRetriever`
(a saved terse index as a retriever).

Needs the `llamaindex` extra (llama-index-core). Both plug in where LlamaIndex takes their base classes:

    from llama_index.core.query_engine import RetrieverQueryEngine
    from terse.integrations.llama_index import TerseIndexRetriever, TerseNodePostprocessor

    engine = RetrieverQueryEngine.from_args(
        TerseIndexRetriever("my-index", k=8), node_postprocessors=[TerseNodePostprocessor(rate=0.5)], llm=...
    )

`TerseNodePostprocessor` compresses the nodes' text for the query, to `rate` or `target_tokens` over all
of them, without a model unless `scorer` names one (see `terse.integrations.common`). Nodes come back most
relevant first, each a copy with its text compressed and its metadata and score unchanged (terse adds no
metadata: LlamaIndex shows metadata to the LLM); a node compressed to nothing is left out.
"""

from __future__ import annotations

from typing import Any, Literal

from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

from terse.integrations.common import IndexSearcher, compress_texts, hit_metadata
from terse.integrations.fields import CompressionFields


class TerseNodePostprocessor(CompressionFields, BaseNodePostprocessor):
    """Question-aware compression of retrieved nodes (see the module docstring)."""

    @classmethod
    def class_name(cls) -> str:
        return "TerseNodePostprocessor"

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query = query_bundle.query_str if query_bundle is not None else ""
        texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        compressor = self._compressor.get()
        kept = compress_texts(compressor, self._compressor.settings.budget, texts, query)
        out = []
        for k in kept:
            node = nodes[k.index].node.model_copy()
            if isinstance(node, TextNode):
                node.set_content(k.text)
            else:  # a node without its own text field: a text node in its place, same id and metadata
                node = TextNode(id_=node.node_id, text=k.text, metadata=dict(node.metadata))
            out.append(NodeWithScore(node=node, score=nodes[k.index].score))
        return out


class TerseIndexRetriever(BaseRetriever):
    """The top-`k` chunks of a saved terse index (`terse index DOCS -o DIR`) as scored text nodes.

    Node ids are "<doc_id>#<chunk_id>"; metadata holds `doc_id`, `chunk_id`, `chunk_index`, `char_start`,
    `char_end` and `score`.
    """

    def __init__(self, index: str, k: int = 4, mode: Literal["hybrid", "dense", "bm25"] = "hybrid", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = k
        self.mode = mode
        self._searcher = IndexSearcher(index)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self._searcher.search(query_bundle.query_str, self.k, self.mode)
        return [
            NodeWithScore(
                node=TextNode(id_=f"{h.doc_id}#{h.chunk_id}", text=h.text, metadata=hit_metadata(h)), score=h.score
            )
            for h in hits
        ]


__all__ = ["TerseIndexRetriever", "TerseNodePostprocessor"]
