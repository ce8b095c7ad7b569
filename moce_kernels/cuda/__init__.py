"""Wrappers around the compiled CUDA C++ extension ``moce_kernels._C``; importing this package
registers them as backend ``cuda``."""
from .._submodules import import_all

import_all(__name__, __path__)  # each module registers its op family's implementations
