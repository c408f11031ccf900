"""Fixtures for terse.retrieval tests: the real MiniLM embedder (loaded once), a fast hashing embedder
for tests about bookkeeping rather than embedding quality, and a seeded known-answer corpus."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from terse.retrieval import Document
from terse.retrieval.chunker import RegexTokenizer
from terse.retrieval.embedder import SentenceTransformerEmbedder


class HashEmbedder:
    """Feature-hashed bag of words (64 dims, normalized): deterministic, instant, no model."""

    def __init__(self, dim: int = 64, name: str = "hash-bow") -> None:
        self._dim = dim
        self._name = name
        self._tokenizer = RegexTokenizer()

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_document_tokens(self) -> int:
        return 512

    def signature(self) -> dict[str, Any]:
        return {"model": self._name, "query_prompt": None, "document_prompt": None, "normalize": True}

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return self._tokenizer.token_offsets(text)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for start, end in self.token_offsets(text.lower()):
                digest = hashlib.blake2b(text.lower()[start:end].encode(), digest_size=4).digest()
                out[row, int.from_bytes(digest, "little") % self._dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)

    def embed_documents(
        self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None
    ) -> np.ndarray:
        if progress is not None:
            progress(len(texts), len(texts))
        return self._embed(texts)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(texts)


@pytest.fixture(scope="session")
def minilm() -> SentenceTransformerEmbedder:
    """The default embedder (bundled all-MiniLM-L6-v2), loaded once for the session."""
    embedder = SentenceTransformerEmbedder()
    _ = embedder.model
    return embedder


@pytest.fixture
def hash_embedder() -> HashEmbedder:
    return HashEmbedder()


_SYLLABLES = ["ka", "lo", "mir", "ven", "tas", "dru", "qui", "sel", "bor", "nax", "pel", "tor", "zim", "rha"]
_KINDS = ["brewery", "shipyard", "observatory", "orchard", "glassworks", "library", "foundry", "vineyard"]
_PRODUCTS = ["amber lager", "river barges", "star charts", "pear cider", "blue lenses", "rare maps",
             "bronze bells", "dry riesling"]
_PLACES = ["a harbour town", "the northern hills", "a desert oasis", "an island port", "a mountain pass",
           "the river delta", "a forest valley", "the eastern plains"]


@dataclass(frozen=True)
class KnownAnswerCorpus:
    documents: list[Document]
    queries: list[tuple[str, str]]  # (question, id of the document holding the answer)


def make_corpus(num_facts: int = 200, seed: int = 7) -> KnownAnswerCorpus:
    """`num_facts` made-up entities, each with one fact document and one distractor document that
    shares the entity's kind, product and place but names a different (made-up) founder and year."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < 2 * num_facts:
        names.add("".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize())
    ordered = sorted(names)
    rng.shuffle(ordered)
    documents: list[Document] = []
    queries: list[tuple[str, str]] = []
    for i in range(num_facts):
        entity, founder = ordered[2 * i], ordered[2 * i + 1]
        kind, product, place = rng.choice(_KINDS), rng.choice(_PRODUCTS), rng.choice(_PLACES)
        year = rng.randint(1700, 1990)
        documents.append(Document(f"fact-{i}", (
            f"The {entity} {kind} lies in {place}. It was founded in {year} by {founder}. "
            f"Today the {entity} {kind} is best known for its {product}."
        )))
        documents.append(Document(f"distractor-{i}", (
            f"Visitors to {place} often ask about the local {kind}. Many a {kind} there sells {product}, "
            f"and guides compare them with the {entity} {kind} at length."
        )))
        if i % 2 == 0:
            queries.append((f"Who founded the {entity} {kind}, and when?", f"fact-{i}"))
        else:
            queries.append((f"Which {kind} did {founder} establish?", f"fact-{i}"))
    return KnownAnswerCorpus(documents, queries)


@pytest.fixture(scope="session")
def known_answer_corpus() -> KnownAnswerCorpus:
    return make_corpus()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Any:
    """Embed with one torch thread: on a shared 2-core machine, two spinning threads per process slow
    small MiniLM batches down several-fold. Restored afterwards (the setting is process-wide)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
