"""Local engine tests. Triton kernels here run in Triton's CPU interpreter, which must be switched on
before anything imports triton (transformers may import it while the other test modules load)."""

import os

os.environ["TRITON_INTERPRET"] = "1"
