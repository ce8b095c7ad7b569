"""Wrappers around the compiled CUDA C++ extension ``moce_kernels._C``; importing this package
registers them as backend ``cuda``."""
from . import expert_stage  # noqa: F401
from . import routing  # noqa: F401
from . import window_attention  # noqa: F401
