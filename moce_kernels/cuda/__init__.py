"""Wrappers around the compiled CUDA C++ extension ``moce_kernels._C``; importing this package
registers them as backend ``cuda``."""
from . import routing  # noqa: F401
from . import window_attention  # noqa: F401
from . import expert_conv  # noqa: F401
from . import experts  # noqa: F401
