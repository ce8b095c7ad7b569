"""Shared helpers for the op modules: input checks and NVTX-wrapped backend dispatch."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Set

import torch

from .. import backends
from ..backends import FLOAT_DTYPES
from ..nvtx import nvtx_range


def _float_dtypes(args) -> Set[torch.dtype]:
    """The dtypes of the floating-point tensor arguments (backends declare which they take)."""
    return {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}


def call_impl(op: str, device: torch.device, *args, **kwargs):
    """Run the backend implementation of ``op`` chosen for ``device`` and the arguments' dtype
    (:func:`moce_kernels.backends.resolve`), inside an NVTX range named after both."""
    name = backends.resolve(op, device, dtypes=_float_dtypes(args))
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
