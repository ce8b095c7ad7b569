"""Shared input checks of the op modules (each op is declared by :func:`._declare.declare`).

Checks that need only shapes, dtypes and devices run on every call. Checks of values held on the
device (routing indices in range, offsets that partition the rows, permutations) would make the host
wait for the device, so they run only under the debug switch: the setting ``debug_checks``
(``MOCE_DEBUG_CHECKS=1`` at import, or ``moce_kernels.settings.update(debug_checks=True)``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..backends import FLOAT_DTYPES
from ..settings import SETTINGS


def check_tensor(name: str, t: torch.Tensor, ndim: int, dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """``t`` is a tensor of ``ndim`` dimensions with one of ``dtypes`` (attribute reads only when it is)."""
    try:
        if t.ndim == ndim and t.dtype in dtypes:
            return
    except AttributeError:
        pass
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in dtypes)}")


def check_tensors(*specs: Tuple[str, Optional[torch.Tensor], int, bool],
                  dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """:func:`check_tensor` of several ``(name, tensor, ndim, optional)``: an optional one may be None."""
    for name, t, ndim, optional in specs:
        if t is None and optional:
            continue
        try:
            if t.ndim == ndim and t.dtype in dtypes:
                continue
        except AttributeError:
            pass
        check_tensor(name, t, ndim, dtypes)


def check_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  names: Tuple[str, str] = ("weight", "bias")) -> int:
    """A 1x1 conv's x (B, C_in, H, W), weight (C_out, C_in, 1, 1) with C_out >= 1 and optional bias
    (C_out,), named ``names`` in the errors; returns C_out."""
    check_tensors(("x", x, 4, False), (names[0], weight, 4, False), (names[1], bias, 1, True))
    c_out, c_in = weight.shape[0], x.shape[1]
    if weight.shape[1:] != (c_in, 1, 1):
        raise ValueError(f"{names[0]} must have shape (C_out, {c_in}, 1, 1) for x with {c_in} channels, "
                         f"got {tuple(weight.shape)}")
    if c_out == 0:
        raise ValueError(f"{names[0]} has no output channels (shape {tuple(weight.shape)}); C_out must be >= 1")
    if bias is not None:
        if bias.shape[0] != c_out:
            raise ValueError(f"{names[1]} must have {c_out} entries, got {bias.shape[0]}")
    return c_out


def check_same(names: Sequence[str], tensors: Sequence[Optional[torch.Tensor]], what: str = "device") -> None:
    """All given tensors (None entries skipped) share ``what``: ``device``, ``dtype``, or ``both``."""
    ref = ref_name = None
    for n, t in zip(names, tensors):
        if t is None:
            continue
        if ref is None:
            ref, ref_name = t, n
            continue
        if what != "dtype" and t.device != ref.device:
            raise ValueError(f"{n} is on device {t.device} but {ref_name} is on device {ref.device}")
        if what != "device" and t.dtype != ref.dtype:
            raise ValueError(f"{n} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def debug_checks() -> bool:
    """True under the setting ``debug_checks``: ops also verify device-held values."""
    return SETTINGS.debug_checks


def check_positive(name: str, value: float) -> None:
    """``value`` must be a finite number > 0 (an epsilon, a noise scale)."""
    # a chained comparison, not math.isfinite: it also holds for the symbolic floats of torch.compile(dynamic=True)
    if type(value) is float and 0 < value < math.inf:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymFloat)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_index_tensor(name: str, t: torch.Tensor, shape: Sequence[int], device: torch.device) -> None:
    """An int64 tensor of exactly ``shape`` on ``device``."""
    check_tensor(name, t, len(shape), (torch.int64,))
    if t.shape != shape:
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
