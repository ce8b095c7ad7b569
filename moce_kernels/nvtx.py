"""Named ranges around blocks and ops: NVTX for Nsight Systems, ``record_function`` for torch.profiler.

Off unless asked for. NVTX: the setting ``nvtx`` (``MOCE_NVTX=1`` at import, or
``moce_kernels.nvtx.enable(True)``; CUDA only). torch.profiler: :func:`record_functions`
(``benchmarks/profile_families.py`` uses it to sum kernel time per op family). When both are off,
:func:`nvtx_range` returns a shared no-op context and an op's implementation runs unwrapped
(:func:`wrap_op`): no string formatting, no calls.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Optional

import torch

from . import settings
from .settings import SETTINGS

_ENABLED = SETTINGS.nvtx
_RECORD = False
_NULL = contextlib.nullcontext()


def _follow(s: settings.Settings) -> None:
    global _ENABLED
    _ENABLED = bool(s.nvtx)


settings.on_change(_follow)


def enable(on: bool = True) -> None:
    """Switch NVTX ranges on or off for the whole process (the setting ``nvtx``)."""
    settings.update(nvtx=bool(on))


def enabled() -> bool:
    return _ENABLED


def record_functions(on: bool = True) -> None:
    """Switch ``torch.profiler.record_function`` ranges (same names as the NVTX ranges) on or off."""
    global _RECORD
    _RECORD = bool(on)
    from . import backends  # the ops' memoized implementations are wrapped, or not, by wrap_op
    backends.clear_choices()


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


def wrap_op(fn: Callable, op: str, backend: str) -> Callable:
    """``fn`` (backend ``backend``'s implementation of ``op``) inside a range named ``op[backend]`` when
    ranges are on now, else ``fn`` itself (the backends' memo is dropped when they are switched)."""
    if not (_RECORD or (_ENABLED and torch.cuda.is_available())):
        return fn
    label = f"{op}[{backend}]"

    @functools.wraps(fn)
    def ranged(*args, **kwargs):
        with _range(label):
            return fn(*args, **kwargs)

    return ranged


def annotate(name: Optional[str] = None) -> Callable[[Callable], Callable]:
    """Decorator: run the function inside an NVTX range (its qualified name by default) when enabled.

    Each decorated function gets a code object of its own, so that ``torch.compile`` keeps one cache per
    decorated function (a shared wrapper would collect a recompilation per function and per module
    instance, up to Dynamo's recompile limit)."""

    def deco(fn: Callable) -> Callable:
        label = name or fn.__qualname__.replace(".forward", "")

        def wrapper(*args, **kwargs):
            if _RECORD or (_ENABLED and torch.cuda.is_available()):
                with _range(label):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        wrapper.__code__ = wrapper.__code__.replace(co_name=f"{fn.__name__}_ranged",
                                                    co_qualname=f"{fn.__qualname__}_ranged")
        return functools.wraps(fn)(wrapper)

    return deco
