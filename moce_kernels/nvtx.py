"""Named ranges around blocks and ops: NVTX for Nsight Systems, ``record_function`` for torch.profiler.

Off unless asked for. NVTX: the environment variable ``MOCE_NVTX=1`` or ``moce_kernels.nvtx.enable(True)``
(CUDA only). torch.profiler: :func:`record_functions` (``benchmarks/profile_families.py`` uses it to sum
kernel time per op family). When both are off, :func:`nvtx_range` returns a shared no-op context: no
string formatting, no calls.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, ContextManager, Optional

import torch

_ENABLED = os.environ.get("MOCE_NVTX", "0") not in ("", "0")
_RECORD = False
_NULL = contextlib.nullcontext()


def enable(on: bool = True) -> None:
    """Switch NVTX ranges on or off for the whole process."""
    global _ENABLED
    _ENABLED = bool(on)


def enabled() -> bool:
    return _ENABLED


def record_functions(on: bool = True) -> None:
    """Switch ``torch.profiler.record_function`` ranges (same names as the NVTX ranges) on or off."""
    global _RECORD
    _RECORD = bool(on)


@contextlib.contextmanager
def _range(name: str):
    nvtx = _ENABLED and torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        if _RECORD:
            with torch.profiler.record_function(name):
                yield
        else:
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


def nvtx_range(name: str) -> ContextManager:
    """A range named ``name`` when NVTX (with CUDA present) or record_function ranges are on, else a no-op."""
    if _RECORD or (_ENABLED and torch.cuda.is_available()):
        return _range(name)
    return _NULL


def annotate(name: Optional[str] = None) -> Callable[[Callable], Callable]:
    """Decorator: run the function inside an NVTX range (its qualified name by default) when enabled."""

    def deco(fn: Callable) -> Callable:
        label = name or fn.__qualname__.replace(".forward", "")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _RECORD or (_ENABLED and torch.cuda.is_available()):
                with _range(label):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return wrapper

    return deco
