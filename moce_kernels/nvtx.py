"""NVTX ranges around blocks and ops, for Nsight Systems. Off unless asked for.

Turn on with the environment variable ``MOCE_NVTX=1`` or ``moce_kernels.nvtx.enable(True)``.
When off, :func:`nvtx_range` returns a shared no-op context: no string formatting, no calls.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, ContextManager, Optional

import torch

_ENABLED = os.environ.get("MOCE_NVTX", "0") not in ("", "0")
_NULL = contextlib.nullcontext()


def enable(on: bool = True) -> None:
    """Switch NVTX ranges on or off for the whole process."""
    global _ENABLED
    _ENABLED = bool(on)


def enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def _range(name: str):
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def nvtx_range(name: str) -> ContextManager:
    """An NVTX range named ``name`` when enabled and CUDA is present, else a no-op."""
    if _ENABLED and torch.cuda.is_available():
        return _range(name)
    return _NULL


def annotate(name: Optional[str] = None) -> Callable[[Callable], Callable]:
    """Decorator: run the function inside an NVTX range (its qualified name by default) when enabled."""

    def deco(fn: Callable) -> Callable:
        label = name or fn.__qualname__.replace(".forward", "")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _ENABLED and torch.cuda.is_available():
                with _range(label):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return wrapper

    return deco
