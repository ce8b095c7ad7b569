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
clears it), then the setting ``backend`` (:mod:`moce_kernels.settings`: the environment variable ``MOCE_BACKEND``
read at import, or ``settings.update(backend=...)``), then ``auto``. An op's backward runs with
the choice that was in force for its forward (the autograd engine may run it on a thread of its own).
An unknown name, or a backend that cannot run here, is an error that says why.

Dispatch: each op declared in :mod:`moce_kernels.ops` owns an :class:`OpDispatch`, its implementations
in registration order and a memo of the choice per (backend choice, device type, dtypes of its tensor
arguments), plus the shape class where the choice depends on the inputs' shapes (an implementation
with an input check, or a chooser on a tunable device). After the first call of a key an op call costs
one dictionary lookup: no import, environment read or ``cuda.is_available()``. The memo is dropped when
an implementation is registered, a setting changes, or the chooser changes.

``auto`` on CUDA: the candidates are the eligible implementations in the op's declared order, the
reference included, and the chooser (:func:`set_chooser`; default :func:`measured_candidate`: the fastest
as timed on this GPU at the key's first call, :mod:`moce_kernels.autotune`) picks one per key; :func:`explain` says why each
implementation can or cannot run given inputs (also printed for every new key under
``MOCE_DEBUG_CHECKS=1``).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
from typing import Any, Callable, Dict, FrozenSet, Hashable, Iterable, Iterator, List, Mapping, NamedTuple
from typing import Optional, Sequence, Tuple

import torch

from . import settings as _settings
from .settings import SETTINGS

BACKENDS: Tuple[str, ...] = ("reference", "triton", "cuda")
_CHOICES: Tuple[str, ...] = BACKENDS + ("auto",)
FLOAT_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP32_AND_16BIT: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

# Modules that register each backend's implementations when imported.
_BACKEND_MODULES = {
    "reference": "moce_kernels.reference",
    "triton": "moce_kernels.triton",
    "cuda": "moce_kernels.cuda",
}
# The order of ``auto`` on CUDA for ops that declare none.
DEFAULT_CUDA_ORDER: Tuple[str, ...] = ("cuda", "triton", "reference")


class BackendUnavailableError(RuntimeError):
    """Raised when a named backend cannot run on this machine or for these tensors."""


class _State:
    default: Optional[str] = None  # set_backend(): process-wide
    effective: Optional[str] = "auto"  # default, else the setting; None while the setting is not a backend name
    loaded: set = set()  # backends whose modules were imported
    unavailable: Dict[str, Optional[str]] = {}  # backend -> why it cannot run here (None: it can)
    blocks: int = 0  # backend() blocks open in any thread (none: no context variable to read)


_BLOCKS_LOCK = threading.Lock()
# backend() context managers: the innermost choice of this thread / task (a new thread starts empty)
_SCOPED: "contextvars.ContextVar[Optional[str]]" = contextvars.ContextVar("moce_backend", default=None)


def _check_name(name: str, source: str = "") -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        where = f" (from {source})" if source else ""
        raise ValueError(f"unknown backend {name!r}{where}; choose one of {', '.join(_CHOICES)}")
    return name


def triton_interpreted() -> bool:
    """True when Triton runs in its CPU interpreter (setting ``triton_interpret``, ``TRITON_INTERPRET=1``)."""
    return SETTINGS.triton_interpret


def cuda_emulated() -> bool:
    """True when backend ``cuda`` runs its kernels in the CPU emulation (``MOCE_CUDA_EMULATION=1``,
    no CUDA device)."""
    return SETTINGS.cuda_emulation and not torch.cuda.is_available()


def _find_why_unavailable(name: str) -> Optional[str]:
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


def _why_unavailable(name: str) -> Optional[str]:
    """None when backend ``name`` can run on this machine, else the reason it cannot (found once per
    setting change)."""
    if name not in _State.unavailable:
        _State.unavailable[name] = _find_why_unavailable(name)
    return _State.unavailable[name]


def available_backends() -> List[str]:
    """Names of the backends that can run on this machine."""
    return [b for b in BACKENDS if _why_unavailable(b) is None]


def _require(name: str) -> None:
    why = _why_unavailable(name)
    if why is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {why}")


def _refresh_effective() -> None:
    choice = _State.default if _State.default is not None else SETTINGS.backend
    _State.effective = choice if choice in _CHOICES else None


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend, seen by every thread outside a :func:`backend` block
    (``auto``: automatic choice; ``None``: clear it, so the setting ``backend`` (``MOCE_BACKEND``)
    applies again)."""
    if name is not None:
        _check_name(name)
        if name != "auto":
            _require(name)
    _State.default = name
    _refresh_effective()


def get_backend() -> str:
    """The backend name in force for the calling thread (may be ``auto``)."""
    scoped = _SCOPED.get()
    if scoped is not None:
        return scoped
    if _State.default is not None:
        return _State.default
    return _check_name(SETTINGS.backend or "auto", "the environment variable MOCE_BACKEND")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: ops called inside the block, by this thread (or asyncio task), run with
    backend ``name``; other threads are unaffected. Blocks nest."""
    _check_name(name)
    if name != "auto":
        _require(name)
    token = _SCOPED.set(name)
    with _BLOCKS_LOCK:
        _State.blocks += 1
    try:
        yield
    finally:
        with _BLOCKS_LOCK:
            _State.blocks -= 1
        _SCOPED.reset(token)


class Support(NamedTuple):
    """What one backend's implementation of one op declares it takes (cf. NATTEN's configs/checks.py).

    ``dtypes``: the dtypes its floating-point tensor arguments may have.
    ``devices``: device types; None for every device the backend runs on (``_DEVICE_RULES``).
    ``check``: ``check(*args) -> None or the reason it cannot run these inputs`` (shapes, window
    sizes, ...), or None when it takes every input the op accepts.
    """
    dtypes: FrozenSet[torch.dtype]
    devices: Optional[FrozenSet[str]]
    check: Optional[Callable[..., Optional[str]]] = None


class OpDispatch:
    """The dispatch side of one op's declaration: its implementations and its memoized choices.

    ``cuda_order``: the backends in the order ``auto`` tries them on CUDA (measured speed).
    ``key_args``: positions of the required tensor arguments; the first gives the device, all give
    the dtypes of the memo key. ``shape_class(*args)``: a hashable summary of the inputs that decides
    the implementations' checks and a chooser's answer (default: the first key argument's shape).
    """

    def __init__(self, name: str, cuda_order: Sequence[str], key_args: Sequence[int],
                 shape_class: Optional[Callable[..., Hashable]] = None):
        self.name = name
        self.cuda_order = tuple(cuda_order)
        self.key_args = tuple(key_args)
        self.shape_class = shape_class or (lambda *args: tuple(args[self.key_args[0]].shape))
        self.impls: Dict[str, Callable] = {}
        self.support: Dict[str, Support] = {}
        self.memo: Dict[tuple, Callable] = {}
        self.names: Dict[tuple, str] = {}  # memo key (with the shape class, if any) -> backend that runs it

    def __call__(self, *args):
        """Run the implementation chosen for ``args`` (memoized; see the module docstring)."""
        choice = (_SCOPED.get() or _State.effective) if _State.blocks else _State.effective
        key = (choice, args[self.key_args[0]].device.type)
        for i in self.key_args:
            key += (args[i].dtype,)
        try:
            fn = self.memo[key]
        except KeyError:
            fn = _choose(self, key, args)
        return fn(*args)


_OPS: Dict[str, OpDispatch] = {}
_IMPLS: Dict[str, Dict[str, Callable]] = {}  # op -> backend -> implementation (each OpDispatch's impls)
_SUPPORT: Dict[str, Dict[str, Support]] = {}  # op -> backend -> what it declares


def declare(name: str, cuda_order: Sequence[str] = DEFAULT_CUDA_ORDER, key_args: Sequence[int] = (0,),
            shape_class: Optional[Callable[..., Hashable]] = None) -> OpDispatch:
    """The :class:`OpDispatch` of op ``name`` (called by the op's declaration in :mod:`moce_kernels.ops`)."""
    if name in _OPS:
        raise ValueError(f"op {name!r} is declared twice")
    table = OpDispatch(name, cuda_order, key_args, shape_class)
    _OPS[name] = table
    _IMPLS[name] = table.impls
    _SUPPORT[name] = table.support
    return table


def op_dispatch(name: str) -> OpDispatch:
    """The :class:`OpDispatch` of the declared op ``name``."""
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no op {name!r} is declared; declared: {', '.join(sorted(_OPS))}") from None


def clear_choices(*_ignored) -> None:
    """Forget every memoized choice (after a registration, a setting change or a new chooser)."""
    for table in _OPS.values():
        table.memo.clear()
        table.names.clear()


def register(op: str, backend_name: str, *, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
             devices: Optional[Iterable[str]] = None,
             check: Optional[Callable[..., Optional[str]]] = None) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as backend ``backend_name``'s implementation of the declared ``op``.

    ``dtypes``: the dtypes its floating-point tensor arguments may have (default: every floating
    dtype); a call with another one runs the reference instead, also when ``backend_name`` was
    chosen by name (see :func:`resolve`).
    ``devices``: device types it takes (default: wherever the backend runs).
    ``check``: ``check(*args) -> None or the reason`` for inputs it cannot run (the reference runs them).
    """
    table = op_dispatch(op)
    _check_name(backend_name)

    def deco(fn: Callable) -> Callable:
        table.impls[backend_name] = fn
        table.support[backend_name] = Support(frozenset(dtypes), None if devices is None else frozenset(devices),
                                              check)
        clear_choices()
        return fn

    return deco


def register_all(backend_name: str, impls: Mapping[str, Callable], *, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
                 devices: Optional[Iterable[str]] = None,
                 checks: Optional[Mapping[str, Callable[..., Optional[str]]]] = None) -> None:
    """:func:`register` every ``op -> fn`` of ``impls`` with the same declaration (``checks``: op -> check)."""
    dtypes = tuple(dtypes)
    for op, fn in impls.items():
        register(op, backend_name, dtypes=dtypes, devices=devices, check=(checks or {}).get(op))(fn)


@contextlib.contextmanager
def override(op: str, backend_name: str, fn: Callable) -> Iterator[Callable]:
    """Context manager: backend ``backend_name`` runs ``fn`` for ``op`` inside the block (tests,
    benchmarks); yields the implementation it replaces."""
    table = op_dispatch(op)
    _load(backend_name)
    old = table.impls[backend_name]
    table.impls[backend_name] = fn
    clear_choices()
    try:
        yield old
    finally:
        table.impls[backend_name] = old
        clear_choices()


def _load(backend_name: str) -> None:
    if backend_name not in _State.loaded:
        importlib.import_module(_BACKEND_MODULES[backend_name])
        _State.loaded.add(backend_name)


# Device types on which ``auto`` chooses among several eligible implementations (through the chooser);
# elsewhere ``auto`` runs the reference (the Triton interpreter and the CUDA emulation are for tests).
TUNABLE_DEVICES: FrozenSet[str] = frozenset({"cuda"})
Candidate = Tuple[str, Callable[[], Any]]
Chooser = Callable[[str, tuple, List[Candidate]], str]


def first_candidate(op: str, key: tuple, candidates: List[Candidate]) -> str:
    """The default chooser: the first eligible implementation in the op's declared order."""
    return candidates[0][0]


def measured_candidate(op: str, key: tuple, candidates: List[Candidate]) -> str:
    """The default chooser where the setting ``autotune`` is on (``MOCE_AUTOTUNE``, default on): the
    fastest candidate as timed on this GPU on the key's first call (:mod:`moce_kernels.autotune`; its
    table persists per GPU and versions); the first candidate where the setting is off."""
    if not SETTINGS.autotune:
        return candidates[0][0]
    from . import autotune  # memo miss only
    return autotune.dispatch_chooser(op, key, candidates)


class _Chooser:
    fn: Chooser = measured_candidate


def set_chooser(fn: Optional[Chooser]) -> None:
    """Install ``fn(op, key, candidates) -> backend name`` as ``auto``'s choice among the eligible
    implementations on a tunable device (CUDA). ``key``: the memo key (backend choice, device type,
    dtypes, shape class); ``candidates``: ``(backend name, thunk)`` pairs in the declared order, each thunk
    running that implementation on the call's real inputs. Its answer is memoized per key (not one given
    during a CUDA graph capture, where nothing is timed). ``None`` restores the default
    (:func:`measured_candidate`); :func:`first_candidate` takes the declared order untimed."""
    _Chooser.fn = measured_candidate if fn is None else fn
    clear_choices()


def _capturing(device: torch.device) -> bool:
    """True while the current CUDA stream records a graph (a chooser's answer then is not final)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _auto_order(op: str, device: torch.device) -> Tuple[str, ...]:
    if device.type not in TUNABLE_DEVICES:
        return ("reference",)
    return op_dispatch(op).cuda_order


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


def _input_error(op: str, name: str, dtypes: Iterable[torch.dtype], args: Optional[Sequence[Any]]) -> Optional[str]:
    """Why backend ``name``'s implementation of ``op`` does not take these dtypes (or inputs), or None."""
    support = _SUPPORT.get(op, {}).get(name)
    if support is None:
        return None
    missing = sorted(str(d) for d in set(dtypes) - support.dtypes)
    if missing:
        return f"backend {name!r} does not take {', '.join(missing)} for {op}"
    if support.check is not None and args is not None:
        return support.check(*args)
    return None


def _candidates(op: str, device: torch.device, name: str) -> Tuple[str, List[str]]:
    """The backend choice after the naming rules (a named backend without this op leaves it to
    ``auto``), and the backends that implement ``op`` on ``device`` under it, in order."""
    if name != "auto":
        _require(name)
        _load(name)
        if name not in _IMPLS.get(op, {}):
            name = "auto"
        else:
            why = _device_error(op, name, device)
            if why is not None:
                raise BackendUnavailableError(why)
            return name, [name]
    found = []
    for cand in _auto_order(op, device):
        if _why_unavailable(cand) is None:
            _load(cand)
            if cand in _IMPLS.get(op, {}) and _device_error(op, cand, device) is None:
                found.append(cand)
    return name, found


def _float_dtypes(args: Sequence[Any]) -> FrozenSet[torch.dtype]:
    return frozenset(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())


def _eligible(op: str, candidates: List[str], dtypes: Iterable[torch.dtype],
              args: Optional[Sequence[Any]]) -> List[str]:
    return [c for c in candidates if _input_error(op, c, dtypes, args) is None]


def resolve(op: str, device: torch.device, name: Optional[str] = None, dtypes: Iterable[torch.dtype] = (),
            args: Optional[Sequence[Any]] = None) -> str:
    """Concrete backend that runs ``op`` for tensors on ``device`` of ``dtypes`` (those of its
    floating-point tensor arguments), and, when given, the inputs ``args`` (implementation checks).

    The backend in force (``name``, else :func:`get_backend`); for ``auto``, the first eligible one in
    the op's order on a tunable device (CUDA), the reference elsewhere. A backend named explicitly that
    cannot run here, or not on ``device``, is an error; one that has no implementation of ``op`` at all
    (the cuda backend has none for the fused trunk ops) leaves the op to ``auto``'s choice. An
    implementation that does not declare each of ``dtypes`` (:func:`register`), or whose check refuses
    the inputs, leaves the call to the reference (the oracle takes every dtype; e.g. float64, which most
    Triton and CUDA kernels do not take). The NVTX range of each call names the backend that ran it.
    """
    name = get_backend() if name is None else _check_name(name)
    name, found = _candidates(op, device, name)
    eligible = _eligible(op, found, dtypes, args)
    return eligible[0] if eligible else "reference"


def explain(op: str, *args, name: Optional[str] = None) -> str:
    """Why each implementation of ``op`` can or cannot run ``args`` under backend ``name`` (default:
    the one in force), and which one runs them: one line per backend."""
    table = op_dispatch(op)
    device = args[table.key_args[0]].device
    choice = get_backend() if name is None else _check_name(name)
    for b in BACKENDS:
        if _why_unavailable(b) is None:
            _load(b)
    dtypes = _float_dtypes(args)
    lines = [f"{op} on {device.type}, dtypes {', '.join(sorted(str(d) for d in dtypes)) or 'none'}, "
             f"backend {choice!r}:"]
    for b in BACKENDS:
        why = (_why_unavailable(b) or ("no implementation" if b not in table.impls else None)
               or _device_error(op, b, device) or _input_error(op, b, dtypes, args))
        lines.append(f"  {b}: {'can run' if why is None else why}")
    lines.append(f"  runs: {resolve(op, device, choice, dtypes, args)}")
    return "\n".join(lines)


def _shape_dependent(op: str, names: Sequence[str], device: torch.device) -> bool:
    """True when the choice among ``names`` depends on the inputs' shape class."""
    return (any(_SUPPORT[op][n].check is not None for n in names if n in _SUPPORT[op])
            or (device.type in TUNABLE_DEVICES and len(names) > 1 and _Chooser.fn is not first_candidate))


def _choose(table: OpDispatch, key: tuple, args: Sequence[Any]) -> Callable:
    """The memo miss of ``table(*args)``: resolve the key's choice, memoize and return its callable."""
    device = args[table.key_args[0]].device
    choice = get_backend() if key[0] is None else key[0]
    _, found = _candidates(table.name, device, choice)
    dtypes = _float_dtypes(args)
    found = _eligible(table.name, found, dtypes, None)
    if _shape_dependent(table.name, found, device):
        per_shape: Dict[Hashable, Callable] = {}

        def by_shape(*call_args):
            cls = table.shape_class(*call_args)
            fn = per_shape.get(cls)
            if fn is None:
                eligible = _eligible(table.name, found, dtypes, call_args)
                if not eligible and choice != "auto" and found == [choice]:
                    _refuse_named(table, choice, dtypes, call_args)
                fn = _finish(table, key + (cls,), eligible, call_args, device)
                if not _capturing(device):
                    per_shape[cls] = fn
            return fn(*call_args)

        table.memo[key] = by_shape
        return by_shape
    table.memo[key] = fn = _finish(table, key, found, args, device)
    return fn


def _refuse_named(table: OpDispatch, name: str, dtypes: Iterable[torch.dtype], args: Sequence[Any]) -> None:
    """Backend ``name``, chosen by name, whose implementation's check refuses ``args`` (it takes their
    dtypes): a ``ValueError`` with the check's reason and the backends that take them. (An undeclared
    dtype instead runs the reference: the declaration rule of :func:`resolve`.)"""
    support = table.support.get(name)
    if support is None or support.check is None or not support.dtypes.issuperset(dtypes):
        return
    why = support.check(*args)
    if why is None:
        return
    others = [b for b in dict.fromkeys(table.cuda_order + BACKENDS) if b != name and b in table.impls and _why_unavailable(b) is None
              and _input_error(table.name, b, dtypes, args) is None]
    raise ValueError(f"{table.name}: {why}; run this op with backend "
                     f"{' or '.join(repr(b) for b in others) or 'auto'}")


def _finish(table: OpDispatch, key: tuple, eligible: List[str], args: Sequence[Any],
            device: torch.device) -> Callable:
    """The callable for ``key`` among ``eligible`` (the chooser decides on a tunable device)."""
    if not eligible:
        name = "reference"
    elif len(eligible) > 1 and device.type in TUNABLE_DEVICES and _Chooser.fn is not first_candidate:
        name = _Chooser.fn(table.name, key, [(n, _thunk(table.impls[n], args)) for n in eligible])
        if name not in eligible:
            raise ValueError(f"the chooser picked {name!r} for {table.name}; candidates: {', '.join(eligible)}")
    else:
        name = eligible[0]
    _load(name)
    table.names[key] = name
    if SETTINGS.debug_checks:
        print(explain(table.name, *args, name=key[0] or None))
    from . import nvtx  # memo miss only
    return nvtx.wrap_op(table.impls[name], table.name, name)


def _thunk(fn: Callable, args: Sequence[Any]) -> Callable[[], Any]:
    return lambda: fn(*args)


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


def _on_settings(_s) -> None:
    _State.unavailable.clear()
    _refresh_effective()
    clear_choices()


_settings.on_change(_on_settings)
_refresh_effective()
