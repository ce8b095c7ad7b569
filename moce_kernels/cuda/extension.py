"""Loads the compiled ops into ``torch.ops.moce_C``: the CUDA extension ``moce_kernels._C``, or, when
the CUDA emulation is on (``MOCE_CUDA_EMULATION=1`` without a GPU), the same sources built for the
CPU (:mod:`moce_kernels.emulation`). Every module of this package imports it first."""
from .. import emulation
from ..backends import cuda_emulated

if cuda_emulated():
    emulation.load()
else:
    import moce_kernels._C  # noqa: F401
