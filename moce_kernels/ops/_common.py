"""Shared helpers for the op modules: input checks and NVTX-wrapped backend dispatch.

Checks that need only shapes, dtypes and devices run on every call. Checks of values held on the
device (routing indices in range, offsets that partition the rows, permutations) would make the host
wait for the device, so they run only under the debug switch: the environment variable
``MOCE_DEBUG_CHECKS=1``, read at each call.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

import torch

from .. import backends
from ..nvtx import nvtx_range

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def call_impl(op: str, device: torch.device, *args, **kwargs):
    """Run backend implementation of ``op`` chosen for ``device``, inside an NVTX range."""
    name = backends.resolve(op, device)
    fn = backends.implementation(op, name)
    with nvtx_range(f"{op}[{name}]"):
        return fn(*args, **kwargs)


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in tuple(dtypes):
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in dtypes)}")


def check_same(names: Sequence[str], tensors: Sequence[Optional[torch.Tensor]], what: str = "device") -> None:
    """All given tensors share ``what`` (``device`` or ``dtype``)."""
    present = [(n, t) for n, t in zip(names, tensors) if t is not None]
    if not present:
        return
    ref_name, ref = present[0]
    for n, t in present[1:]:
        if getattr(t, what) != getattr(ref, what):
            raise ValueError(f"{n} is on {what} {getattr(t, what)} but {ref_name} is on {getattr(ref, what)}"
                             if what == "device" else
                             f"{n} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def debug_checks() -> bool:
    """True when ``MOCE_DEBUG_CHECKS`` is set to anything but ``0``: ops also verify device-held values."""
    return os.environ.get("MOCE_DEBUG_CHECKS", "0") not in ("", "0")


def check_positive(name: str, value: float) -> None:
    """``value`` must be a finite number > 0 (an epsilon, a noise scale)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_index_tensor(name: str, t: torch.Tensor, shape: Sequence[int], device: torch.device) -> None:
    """An int64 tensor of exactly ``shape`` on ``device``."""
    check_tensor(name, t, len(shape), (torch.int64,))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on device {t.device} but the data is on {device}")


def check_permutation(name: str, perm: torch.Tensor) -> None:
    """Debug check (reads the device): ``perm`` holds each of 0 .. n-1 exactly once."""
    n = perm.numel()
    ok = bool(((perm >= 0) & (perm < n)).all()) and (n == 0 or bool(torch.bincount(perm, minlength=n).eq(1).all()))
    if not ok:
        raise ValueError(f"{name} is not a permutation of 0..{n - 1}: {perm.tolist()[:16]}")


def check_segments(name: str, offsets: torch.Tensor, rows: int) -> None:
    """Debug check (reads the device): ``offsets`` (E+1,) starts at 0, never decreases, ends at ``rows``."""
    o = offsets.tolist()
    if o[0] != 0 or o[-1] != rows or any(b < a for a, b in zip(o, o[1:])):
        raise ValueError(f"{name} must rise from 0 to {rows} (one segment of rows per expert), got {o}")
