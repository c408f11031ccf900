"""INT4 quantization tests (the kernels run in Triton's interpreter, switched on by the parent package)."""
