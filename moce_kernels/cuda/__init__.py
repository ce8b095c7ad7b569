"""Wrappers around the compiled CUDA C++ extension ``moce_kernels._C``; importing this package
registers them as backend ``cuda``."""
