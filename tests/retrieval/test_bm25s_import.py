"""bm25s is imported with JAX hidden, so JAX never claims GPU memory behind the engine's back."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_jax_stays_hidden_and_importable_afterwards() -> None:
    # a stand-in `jax` package that records being imported; bm25s would import it and run an op
    out = run("""
        import sys, types, importlib.abc, importlib.machinery
        imported = []
        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "jax" or name.startswith("jax."):
                    imported.append(name)
                    return importlib.machinery.ModuleSpec(name, None, is_package=True)
                return None
        sys.meta_path.insert(0, Finder())
        from terse.retrieval.bm25s_import import load_bm25s
        bm25s = load_bm25s()
        from bm25s import selection
        print(selection.JAX_IS_AVAILABLE, imported, "jax" in sys.modules)
    """)
    assert out == "False [] False"


def test_a_process_that_uses_jax_keeps_it() -> None:
    out = run("""
        import sys, types
        jax = types.ModuleType("jax"); jax.lax = types.ModuleType("jax.lax")
        jax.lax.top_k = lambda scores, k: (scores[:k], list(range(k)))
        sys.modules["jax"], sys.modules["jax.lax"] = jax, jax.lax
        from terse.retrieval.bm25s_import import load_bm25s
        load_bm25s()
        from bm25s import selection
        print(selection.JAX_IS_AVAILABLE)
    """)
    assert out == "True"
