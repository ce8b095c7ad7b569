"""The C allocator's settings for CPU inference: keep freed activations in the heap for the next forward.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold
(128 KiB at start, adapting up to 32 MiB) with a fresh ``mmap`` and returns it to the kernel on
``free``, and it trims the heap's free top above 128 KiB. A MoCE-IR forward allocates and frees
activations of tens to hundreds of MiB each (a 512 x 512 tile of MoCE-IR-S: 32 MiB per 32-channel
map), so every forward maps them anew and touches every page for the first time: a minor page fault
per 4 KiB page and the kernel zeroing it, a large share of the run in system time.

:func:`keep_cpu_memory` sets ``M_MMAP_MAX = 0`` (large blocks come from the heap too) and
``M_TRIM_THRESHOLD`` to its largest value, 2 GiB (the heap keeps up to that much freed top), so freed activations are reused in
place. The process's resident memory then stays at its high-water mark instead of dropping between
forwards. :class:`~moce_kernels.MoCEIR` applies it at its first forward on a CPU tensor; set
``MOCE_CPU_MALLOC=default`` to leave the allocator alone. Only glibc is tuned; elsewhere (musl,
macOS, Windows, or another ``malloc`` preloaded: jemalloc, tcmalloc) nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

from .settings import SETTINGS

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: its largest value, about 2 GiB of free heap top kept

_state: Optional[bool] = None  # None: not tried yet; else whether the settings were applied


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library if it is glibc with ``mallopt``, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # glibc only
        version.restype = ctypes.c_char_p
        version()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return libc


def _other_malloc_preloaded() -> bool:
    return any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_cpu_memory(force: bool = False) -> bool:
    """Apply the settings of the module docstring once per process (again with ``force``); returns
    whether they are in effect. A no-op returning False where the C library is not glibc, another
    allocator is preloaded, or ``MOCE_CPU_MALLOC=default``."""
    global _state
    if _state is not None and not force:
        return _state
    _state = False
    if (SETTINGS.cpu_malloc or "").lower() == "default" or _other_malloc_preloaded():
        return False
    libc = _glibc()
    if libc is None:
        return False
    _state = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _state


def applied() -> Optional[bool]:
    """None before :func:`keep_cpu_memory` ran in this process, else whether its settings took."""
    return _state
