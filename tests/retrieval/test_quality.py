"""Known-answer corpus with the real MiniLM embedder: recall@5 of dense, BM25 and hybrid search, and
recall of HNSW / IVF against exact search on the same embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from terse.retrieval import ChunkerConfig, Retriever, RetrieverConfig
from terse.retrieval.calibration import build_index, calibrate
from terse.retrieval.config import IndexConfig
from terse.retrieval.embedder import SentenceTransformerEmbedder
from tests.retrieval.conftest import KnownAnswerCorpus


@pytest.fixture(scope="module")
def indexed(minilm: SentenceTransformerEmbedder, known_answer_corpus: KnownAnswerCorpus) -> Retriever:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest._one_torch_thread (this fixture outlives a single test)
    retriever = Retriever(RetrieverConfig(chunker=ChunkerConfig(64, 8)), embedder=minilm)
    retriever.add_documents(known_answer_corpus.documents)
    torch.set_num_threads(previous)
    return retriever


def _recall_at_5(retriever: Retriever, corpus: KnownAnswerCorpus, mode: str) -> float:
    questions = [q for q, _ in corpus.queries]
    results = retriever.search_batch(questions, k=5, mode=mode)  # type: ignore[arg-type]
    found = [any(h.doc_id == answer for h in hits) for hits, (_, answer) in zip(results, corpus.queries)]
    return sum(found) / len(found)


def test_hybrid_recall_matches_the_better_mode(indexed: Retriever, known_answer_corpus: KnownAnswerCorpus) -> None:
    recall = {mode: _recall_at_5(indexed, known_answer_corpus, mode) for mode in ("dense", "bm25", "hybrid")}
    print("recall@5 on 200 known-answer questions:", recall)
    # Sanity floors: both modes find most answers on their own (MiniLM reads made-up names as
    # word pieces, so dense is the weaker one on "Which <kind> did <founder> establish?").
    assert recall["dense"] >= 0.6 and recall["bm25"] >= 0.9
    # RRF can only lose an answer that one mode ranks in its top 5 when the other mode ranks several
    # distractors above it; each fact has one close distractor, so at most a few answers per hundred
    # can drop: 0.02 (4 of 200 questions) of tolerance.
    assert recall["hybrid"] >= max(recall["dense"], recall["bm25"]) - 0.02


def test_hits_carry_exact_offsets_and_ranks(indexed: Retriever, known_answer_corpus: KnownAnswerCorpus) -> None:
    texts = {d.id: d.text for d in known_answer_corpus.documents}
    question, answer = known_answer_corpus.queries[0]
    hits = indexed.search(question, k=5, mode="hybrid")
    assert hits[0].doc_id == answer and hits[0].dense_rank is not None and hits[0].bm25_rank is not None
    assert all(texts[h.doc_id][h.char_start : h.char_end] == h.text for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    only = indexed.search(question, k=5, mode="dense", doc_ids=["distractor-0", "fact-3"])
    assert {h.doc_id for h in only} == {"distractor-0", "fact-3"}


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_recall_against_exact_on_minilm_vectors(indexed: Retriever, kind: str) -> None:
    assert indexed.vectors is not None and indexed.vectors.kind == "flat"
    ids, vectors = indexed.vectors.export()  # [400, 384] MiniLM chunk embeddings
    config = IndexConfig(kind=kind, min_recall=0.95, num_recall_queries=200)  # type: ignore[arg-type]
    ann = build_index(kind, vectors.shape[1], config, ids, vectors)
    report = calibrate(ann, config)
    print(f"{kind} on MiniLM vectors: recall@10 vs exact {report.recall:.3f} at {report.knob}={report.knob_value}")
    assert report.meets_target and report.recall >= 0.95
    # the same top-5 as exact search for real questions, up to the recall floor
    queries = indexed.embedder.embed_queries(["Who founded the brewery?", "Which vineyard sells dry riesling?"])
    exact = set(np.ravel(indexed.vectors.search(queries, 5)[1]))
    approx = set(np.ravel(ann.search(queries, 5)[1]))
    assert len(exact & approx) >= 9


def test_prompts_change_the_vector_space(minilm: SentenceTransformerEmbedder) -> None:
    from terse.retrieval.config import EmbedderConfig

    prompted = SentenceTransformerEmbedder(EmbedderConfig(query_prompt="query: ", document_prompt="passage: "))
    assert prompted.model is minilm.model  # one loaded model per process and device
    text = ["The lighthouse was built in 1871."]
    assert not np.allclose(prompted.embed_queries(text), minilm.embed_queries(text))
    np.testing.assert_allclose(np.linalg.norm(prompted.embed_documents(text), axis=1), 1.0, rtol=1e-5)
    assert prompted.max_document_tokens == minilm.max_document_tokens - len(minilm.token_offsets("passage: "))
    assert prompted.signature() != minilm.signature()
