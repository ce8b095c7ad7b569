"""Shared helpers for the op modules: input checks, NVTX-wrapped backend dispatch, and the definition of
an op with its backward op and autograd formula (:func:`define_op`).

Checks that need only shapes, dtypes and devices run on every call. Checks of values held on the
device (routing indices in range, offsets that partition the rows, permutations) would make the host
wait for the device, so they run only under the debug switch: the environment variable
``MOCE_DEBUG_CHECKS=1``, read at each call.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Optional, Sequence, Set, Tuple

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


def check_conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  names: Tuple[str, str] = ("weight", "bias")) -> int:
    """A 1x1 conv's x (B, C_in, H, W), weight (C_out, C_in, 1, 1) and optional bias (C_out,), named
    ``names`` in the errors; returns C_out."""
    check_tensor("x", x, 4, FLOAT_DTYPES)
    check_tensor(names[0], weight, 4, FLOAT_DTYPES)
    c_out, c_in = weight.shape[0], x.shape[1]
    if tuple(weight.shape[1:]) != (c_in, 1, 1):
        raise ValueError(f"{names[0]} must have shape (C_out, {c_in}, 1, 1) for x with {c_in} channels, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(names[1], bias, 1, FLOAT_DTYPES)
        if bias.shape[0] != c_out:
            raise ValueError(f"{names[1]} must have {c_out} entries, got {bias.shape[0]}")
    return c_out


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


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)``, with the backward run under the backend
    choice that was in force for the forward. Backend blocks are per thread, and the autograd engine
    runs the backward of CUDA tensors on threads of its own, where the caller's block is not in force."""

    def setup(ctx, inputs, output):
        ctx.backend_choice = backends.get_backend()
        setup_context(ctx, inputs, output)

    def run(ctx, *grads):
        with backends.backend(ctx.backend_choice):
            return backward(ctx, *grads)

    op.register_autograd(run, setup_context=setup)


def define_op(name: str, params: Sequence[Tuple[str, str]], out_shape: Callable[..., Sequence[int]],
              passthrough: Optional[str] = None) -> Callable:
    """Define the custom op ``moce::{name}`` and its backward op ``moce::{name}_backward``.

    ``params``: the op's inputs in order, as ``(schema type, name)`` pairs ("Tensor", "Tensor?", "float",
    "int"); the op returns one tensor of ``out_shape(*inputs)`` in the first input's dtype, computed by the
    backend implementation of ``name``. The backward op takes ``(grad, *inputs)`` (less ``passthrough``)
    and returns, in input order, the gradient of every tensor input that is present (not None); backend
    implementation ``{name}_backward``. ``passthrough`` names an optional tensor input that the op adds
    to its result (a residual): its gradient is ``grad`` itself, so the backward op neither takes nor
    returns it, and it is not saved. Every other tensor input is saved for the backward; non-tensor
    inputs get no gradient.
    """
    schema = ", ".join(f"{t} {n}" for t, n in params)
    kept = [(t, n) for t, n in params if n != passthrough]  # the backward op's inputs (after grad)
    kept_tensor = [t.startswith("Tensor") for t, _ in kept]
    at = [n for _, n in params].index(passthrough) if passthrough is not None else None

    def _fwd(*args):
        return call_impl(name, args[0].device, *args)

    def _bwd(grad, *args):
        return list(call_impl(name + "_backward", grad.device, grad, *args))

    fwd = torch.library.custom_op(f"moce::{name}", _fwd, mutates_args=(), schema=f"({schema}) -> Tensor")
    bwd = torch.library.custom_op(f"moce::{name}_backward", _bwd, mutates_args=(),
                                  schema=f"(Tensor grad, {', '.join(f'{t} {n}' for t, n in kept)}) -> Tensor[]")

    @fwd.register_fake
    def _(*args):
        return args[0].new_empty(tuple(out_shape(*args)))

    @bwd.register_fake
    def _(grad, *args):
        return [torch.empty_like(a) for a, t in zip(args, kept_tensor) if t and a is not None]

    def setup(ctx, inputs, output):
        args = [a for i, a in enumerate(inputs) if i != at]
        ctx.save_for_backward(*[a for a, t in zip(args, kept_tensor) if t])
        ctx.scalars = [a for a, t in zip(args, kept_tensor) if not t]
        ctx.passthrough = at is not None and inputs[at] is not None

    def backward(ctx, grad):
        tensors, scalars = iter(ctx.saved_tensors), iter(ctx.scalars)
        args = [next(tensors) if t else next(scalars) for t in kept_tensor]
        grads = iter(bwd(grad.contiguous(), *args))
        out = [next(grads) if t and a is not None else None for a, t in zip(args, kept_tensor)]
        if at is not None:
            out.insert(at, grad if ctx.passthrough else None)
        return tuple(out)

    register_autograd(fwd, backward, setup)
    return fwd
