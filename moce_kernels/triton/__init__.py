"""Triton kernels, one module per op family; importing this package registers them as backend ``triton``."""
from .._submodules import import_all

import_all(__name__, __path__)  # each module registers its op family's implementations
