"""terse.kernels"""
