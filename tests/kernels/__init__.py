"""Kernel tests run the Triton kernels in Triton's CPU interpreter; it must be on before triton loads them."""

import os

os.environ["TRITON_INTERPRET"] = "1"
