"""Import bm25s without waking JAX.

When JAX is installed, importing bm25s runs a JAX operation (to pick its top-k backend). That starts
JAX's GPU client, which by default claims 75% of the GPU's memory for itself. In a process that also
runs terse's engine, the engine's KV cache and CUDA graphs are then left with a quarter of the
device. terse only reads bm25s's NumPy scores, so `load_bm25s` imports it with JAX hidden. A process
that has already imported JAX made that choice itself and is left alone. JAX is hidden only for the
first import of bm25s, which happens once per process; another thread importing JAX at that very
moment would see an ImportError.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

_lock = threading.Lock()


def load_bm25s() -> ModuleType:
    """The bm25s module, imported with JAX hidden unless this process already uses JAX."""
    with _lock:
        if "bm25s" in sys.modules or "jax" in sys.modules:
            import bm25s

            return bm25s
        sys.modules["jax"] = None  # type: ignore[assignment]  # `import jax` raises ImportError
        try:
            import bm25s
        finally:
            del sys.modules["jax"]
        return bm25s
