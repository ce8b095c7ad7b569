"""Triton kernels, one module per op family; importing this package registers them as backend ``triton``."""
