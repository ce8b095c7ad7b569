"""Pure-PyTorch implementations of every op: the oracle, and the CPU path."""
from .._submodules import import_all

import_all(__name__, __path__)  # each module registers its op family's implementations
