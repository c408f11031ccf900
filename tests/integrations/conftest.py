"""Shared data for the framework adapters' tests: a few documents, one of which answers the question,
and a saved terse index over them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# LiteLLM fetches a model price list from the internet at import unless told to use its bundled copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

QUESTION = "Where does Alice Moreau work?"
DOCS = {
    "weather": "The weather in the valley was mild all spring. Farmers planted early and the rivers ran "
               "high after the snow melted in the northern hills, flooding two bridges near the old mill.",
    "alice": "Alice Moreau works at Acme Corp in Paris, where she leads the battery research group. Before "
             "Acme Corp she studied chemistry in Lyon and spent two years at a start-up in Grenoble.",
    "recipes": "To bake the bread, mix flour, water, salt and yeast, knead for ten minutes, let the dough "
               "rise for two hours, shape it, and bake it at two hundred and thirty degrees for forty minutes.",
    "history": "The city walls were built in the twelfth century and rebuilt twice after sieges. Only the "
               "north gate survives today, beside a museum of maps, coins and old tools from the region.",
}


@pytest.fixture(scope="session")
def saved_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from terse.retrieval import Document, Retriever

    path = tmp_path_factory.mktemp("terse-index") / "index"
    retriever = Retriever()
    retriever.add_documents([Document(id=doc_id, text=text) for doc_id, text in DOCS.items()])
    retriever.save(path)
    return path


@pytest.fixture(scope="session")
def terse_server(tiny_llama: Path) -> Iterator[tuple[str, str, str]]:
    """`terse serve` in engine mode over the tiny model: (root URL, chat model id, embedding model id)."""
    from terse.backend import load_backend
    from terse.pipelines.server import ServerConfig, ServerThread, engine_app
    from terse.retrieval.config import DEFAULT_EMBEDDER

    backend = load_backend(f"local:{tiny_llama}", num_kv_blocks=128)
    server = ServerThread(engine_app(backend, ServerConfig(served_model_names=("tiny",)))).start()
    yield server.url, "tiny", DEFAULT_EMBEDDER
    server.stop()
