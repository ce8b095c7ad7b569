"""Backend selection: which implementation every op in :mod:`moce_kernels.ops` runs.

Backends:
  ``reference``  pure PyTorch, any device (the oracle, and the CPU path)
  ``triton``     Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  ``cuda``       the compiled CUDA C++ extension (``moce_kernels._C``), CUDA tensors; or, without a
                 GPU and with ``MOCE_CUDA_EMULATION=1``, the same kernels built for the CPU
                 emulation (:mod:`moce_kernels.emulation`), CPU tensors, for tests
  ``auto``       per call, the fastest backend available for the tensors' device

The choice comes, in this order, from the innermost ``with moce_kernels.backend(name):`` of the
calling thread (context-local: a block in one thread, or one asyncio task, never changes what
another runs), then the process-wide ``moce_kernels.set_backend(name)`` (``set_backend(None)``
clears it), then the environment variable ``MOCE_BACKEND``, then ``auto``. An op's backward runs with
the choice that was in force for its forward (the autograd engine may run it on a thread of its own).
An unknown name, or a backend that cannot run here, is an error that says why.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple
from typing import FrozenSet, Iterable, Mapping, NamedTuple

import torch

BACKENDS: Tuple[str, ...] = ("reference", "triton", "cuda")
_CHOICES: Tuple[str, ...] = BACKENDS + ("auto",)

# op name -> backend name -> implementation
_IMPLS: Dict[str, Dict[str, Callable]] = {}
# Modules that register each backend's implementations when imported.
_BACKEND_MODULES = {
    "reference": "moce_kernels.reference",
    "triton": "moce_kernels.triton",
    "cuda": "moce_kernels.cuda",
}


class BackendUnavailableError(RuntimeError):
    """Raised when a named backend cannot run on this machine or for these tensors."""


class _State:
    default: Optional[str] = None  # set_backend(): process-wide


# backend() context managers: the innermost choice of this thread / task (a new thread starts empty)
_SCOPED: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar("moce_backend", default=None)


def _check_name(name: str, source: str = "") -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        where = f" (from {source})" if source else ""
        raise ValueError(f"unknown backend {name!r}{where}; choose one of {', '.join(_CHOICES)}")
    return name


def triton_interpreted() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_emulated() -> bool:
    """True when backend ``cuda`` runs its kernels in the CPU emulation (``MOCE_CUDA_EMULATION=1``,
    no CUDA device)."""
    return os.environ.get("MOCE_CUDA_EMULATION", "0") not in ("", "0") and not torch.cuda.is_available()


def _why_unavailable(name: str) -> Optional[str]:
    """None when backend ``name`` can run on this machine, else the reason it cannot."""
    if name == "reference":
        return None
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as e:  # pragma: no cover - depends on the machine
            return f"triton is not installed ({e})"
        if not (torch.cuda.is_available() or triton_interpreted()):
            return "triton needs a CUDA GPU, or TRITON_INTERPRET=1 to run on the CPU interpreter"
        return None
    if name == "cuda":
        if cuda_emulated():
            from . import emulation
            return emulation.why_unavailable()
        if not torch.cuda.is_available():
            return "the cuda backend needs a CUDA GPU and a CUDA build of PyTorch"
        try:
            importlib.import_module("moce_kernels._C")
        except ImportError as e:
            return (f"the CUDA extension moce_kernels._C is not built ({e}); "
                    "build it with `pip install --no-build-isolation -e .` on a machine with nvcc")
        return None
    raise ValueError(name)


def available_backends() -> List[str]:
    """Names of the backends that can run on this machine."""
    return [b for b in BACKENDS if _why_unavailable(b) is None]


def _require(name: str) -> None:
    why = _why_unavailable(name)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {why}")


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend, seen by every thread outside a :func:`backend` block
    (``auto``: automatic choice; ``None``: clear it, so ``MOCE_BACKEND`` or ``auto`` applies again)."""
    if name is not None:
        _check_name(name)
        if name != "auto":
            _require(name)
    _State.default = name


def get_backend() -> str:
    """The backend name in force for the calling thread (may be ``auto``)."""
    scoped = _SCOPED.get()
    if scoped is not None:
        return scoped
    if _State.default is not None:
        return _State.default
    return _check_name(os.environ.get("MOCE_BACKEND", "auto") or "auto", "the environment variable MOCE_BACKEND")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: ops called inside the block, by this thread (or asyncio task), run with
    backend ``name``; other threads are unaffected. Blocks nest."""
    _check_name(name)
    if name != "auto":
        _require(name)
    token = _SCOPED.set(name)
    try:
        yield
    finally:
        _SCOPED.reset(token)


FLOAT_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP32_AND_16BIT: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


class Support(NamedTuple):
    """What one backend's implementation of one op declares it takes (cf. NATTEN's configs/checks.py).

    ``dtypes``: the dtypes its floating-point tensor arguments may have.
    ``devices``: device types; None for every device the backend runs on (``_DEVICE_RULES``).
    """
    dtypes: FrozenSet[torch.dtype]
    devices: Optional[FrozenSet[str]]


# op name -> backend name -> what the implementation declares
_SUPPORT: Dict[str, Dict[str, Support]] = {}


def register(op: str, backend_name: str, *, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
             devices: Optional[Iterable[str]] = None) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as backend ``backend_name``'s implementation of ``op``.

    ``dtypes``: the dtypes its floating-point tensor arguments may have (default: every floating
    dtype); a call with another one runs the reference instead, also when ``backend_name`` was
    chosen by name (see :func:`resolve`).
    ``devices``: device types it takes (default: wherever the backend runs).
    """

    def deco(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend_name] = fn
        _SUPPORT.setdefault(op, {})[backend_name] = Support(
            frozenset(dtypes), None if devices is None else frozenset(devices))
        return fn

    return deco


def register_all(backend_name: str, impls: Mapping[str, Callable], *, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
                 devices: Optional[Iterable[str]] = None) -> None:
    """:func:`register` every ``op -> fn`` of ``impls`` with the same declaration."""
    dtypes = tuple(dtypes)
    for op, fn in impls.items():
        register(op, backend_name, dtypes=dtypes, devices=devices)(fn)


def _load(backend_name: str) -> None:
    importlib.import_module(_BACKEND_MODULES[backend_name])


# ``auto`` on CUDA: per op family, the backends in order of measured speed (H200, 2026-11-26,
# benchmarks/results/2026-11-26-h200): the Triton window attention beats torch.fft (1.4-8.6x in bf16),
# cuDNN's convolutions beat both fused pw->dw kernels. Ops not listed take the default order; the
# expert stage keeps it although the per-expert loop is faster in eager mode, because the loop reads
# the routing on the host, which would make ``auto`` impossible to capture in a CUDA graph.
# The fused trunk ops (channel attention, the LayerNorm-folded convolutions, the 1x1 with its residual)
# are not timed yet: Triton first, by count (a MoCE-IR forward at 256 px: 317 ops moving 5.4 GB by the
# analytic model, against 1,773 ops and 21.3 GB for the eager ops they replace; bench_model.py's
# test_op_census); `gpu_run.sh profile` times them.
_TRUNK_ORDER = ("triton", "reference")
_FASTEST_ON_CUDA: Dict[str, Tuple[str, ...]] = {
    "window_fft_attention": ("triton", "reference", "cuda"),
    "pointwise_depthwise_conv": ("reference", "cuda", "triton"),
    "pointwise_depthwise_conv_gated": ("reference", "cuda", "triton"),
    "channel_attention": _TRUNK_ORDER,
    "layer_norm_pointwise_depthwise_conv": _TRUNK_ORDER,
    "layer_norm_pointwise_depthwise_conv_gated": _TRUNK_ORDER,
    "layer_norm_pointwise_conv": _TRUNK_ORDER,
    "pointwise_conv": _TRUNK_ORDER,
}
_DEFAULT_CUDA_ORDER = ("cuda", "triton", "reference")


def _auto_order(op: str, device: torch.device) -> Tuple[str, ...]:
    if device.type != "cuda":
        return ("reference",)  # the Triton interpreter is for tests, never chosen automatically
    return _FASTEST_ON_CUDA.get(op.removesuffix("_backward"), _DEFAULT_CUDA_ORDER)


_DEVICE_RULES: Dict[str, Callable[[torch.device], Optional[str]]] = {
    "reference": lambda device: None,
    "cuda": lambda device: (
        None if device.type == "cuda" or (cuda_emulated() and device.type == "cpu")
        else f"backend 'cuda' needs CUDA tensors, got tensors on {device}"),
    "triton": lambda device: (
        None if device.type == "cuda" or triton_interpreted()
        else f"backend 'triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
             "before importing triton to run it on the CPU interpreter"),
}


def _device_error(op: str, name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run ``op`` on ``device``, or None."""
    why = _DEVICE_RULES[name](device)
    support = _SUPPORT.get(op, {}).get(name)
    if why is None and support is not None and support.devices is not None and device.type not in support.devices:
        why = f"backend {name!r} runs {op} on {', '.join(sorted(support.devices))} tensors, got tensors on {device}"
    return why


def resolve(op: str, device: torch.device, name: Optional[str] = None, dtypes: Iterable[torch.dtype] = ()) -> str:
    """Concrete backend that runs ``op`` for tensors on ``device`` of ``dtypes`` (those of its
    floating-point tensor arguments).

    The backend in force (``name``, else :func:`get_backend`); for ``auto``, the fastest available
    one that implements ``op`` on ``device``. A backend named explicitly that cannot run here, or not
    on ``device``, is an error; one that has no implementation of ``op`` at all (the cuda backend has
    none for the fused trunk ops) leaves the op to ``auto``'s choice. Then the declaration rule: when
    the backend's implementation does not declare each of ``dtypes`` (:func:`register`), the reference
    runs the call (the oracle takes every dtype; e.g. float64, which most Triton and CUDA kernels do
    not take). The NVTX range of each call names the backend that ran it.
    """
    name = get_backend() if name is None else _check_name(name)
    if name != "auto":
        _require(name)
        _load(name)
        if op in _IMPLS and name not in _IMPLS[op]:
            name = "auto"
        else:
            why = _device_error(op, name, device)
            if why is not None:
                raise BackendUnavailableError(why)
    if name == "auto":
        name = "reference"
        for cand in _auto_order(op, device):
            if _why_unavailable(cand) is None:
                _load(cand)
                if cand in _IMPLS.get(op, {}) and _device_error(op, cand, device) is None:
                    name = cand
                    break
    support = _SUPPORT.get(op, {}).get(name)
    if support is not None and not support.dtypes.issuperset(dtypes):
        return "reference"
    return name


def implementation(op: str, backend_name: str) -> Callable:
    """The function that implements ``op`` in backend ``backend_name``."""
    _load(backend_name)
    try:
        return _IMPLS[op][backend_name]
    except KeyError:
        have = sorted(_IMPLS.get(op, {}))
        raise NotImplementedError(
            f"op {op!r} has no {backend_name!r} implementation (implemented by: {', '.join(have) or 'none'})"
        ) from None
