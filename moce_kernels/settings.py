"""The package's run-time knobs (the ``MOCE_*`` environment variables), read once into one object.

:data:`SETTINGS` holds them. The environment is read when this module is imported and again by
:func:`reload`; nothing else in the package reads these variables. Change a knob at run time with
:func:`update` (``moce_kernels.settings.update(debug_checks=True)``), which tells the parts that keep
state derived from it (the backends' memoized choices, the NVTX switch) to drop it.

==========================  ============================  =====================================================
field                       variable                      meaning
==========================  ============================  =====================================================
``backend``                 ``MOCE_BACKEND``              default backend (``auto`` when unset or empty)
``debug_checks``            ``MOCE_DEBUG_CHECKS``         ops also check values held on the device
``nvtx``                    ``MOCE_NVTX``                 NVTX ranges on from the start
``cuda_emulation``          ``MOCE_CUDA_EMULATION``       backend ``cuda`` runs the CPU emulation (no GPU)
``triton_interpret``        ``TRITON_INTERPRET``          Triton runs in its CPU interpreter
``pwdw_warps``              ``MOCE_PWDW_WARPS``           warps of the Triton fused pw->dw kernels
``wfa_fp32_precision``      ``MOCE_WFA_FP32_PRECISION``   dot precision of the Triton window attention (fp32)
``wfa_one_shot_elems``      ``MOCE_WFA_ONE_SHOT_ELEMS``   element budget of its one-shot kernels
``cpu_malloc``              ``MOCE_CPU_MALLOC``           ``default``: leave glibc's malloc as it is
                                                          (:mod:`moce_kernels.allocator`)
``autotune``                ``MOCE_AUTOTUNE``             ``auto`` on CUDA times the candidates (``0``: the
                                                          declared order, untimed); default on
==========================  ============================  =====================================================
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, List, Mapping, Optional

_FLAGS = {"debug_checks": "MOCE_DEBUG_CHECKS", "nvtx": "MOCE_NVTX", "cuda_emulation": "MOCE_CUDA_EMULATION",
          "triton_interpret": "TRITON_INTERPRET"}
_VALUES = {"backend": "MOCE_BACKEND", "autotune": "MOCE_AUTOTUNE", "cpu_malloc": "MOCE_CPU_MALLOC", "pwdw_warps": "MOCE_PWDW_WARPS",
           "wfa_fp32_precision": "MOCE_WFA_FP32_PRECISION", "wfa_one_shot_elems": "MOCE_WFA_ONE_SHOT_ELEMS"}


@dataclasses.dataclass
class Settings:
    """One value per knob (see the module docstring); ``None``: unset, the consumer's default applies."""
    backend: str = "auto"
    debug_checks: bool = False
    nvtx: bool = False
    cuda_emulation: bool = False
    triton_interpret: bool = False
    pwdw_warps: Optional[int] = None
    wfa_fp32_precision: Optional[str] = None
    wfa_one_shot_elems: Optional[int] = None
    autotune: bool = True
    cpu_malloc: Optional[str] = None


SETTINGS = Settings()
_LISTENERS: List[Callable[[Settings], None]] = []


def _flag(value: Optional[str]) -> bool:
    return value not in (None, "", "0")


def _int(name: str, value: Optional[str]) -> Optional[int]:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name} must be an integer, got {value!r}") from None


def from_environment(env: Optional[Mapping[str, str]] = None) -> Settings:
    """The settings the environment (``os.environ`` by default) asks for."""
    env = os.environ if env is None else env
    s = Settings(backend=env.get("MOCE_BACKEND") or "auto",
                 wfa_fp32_precision=env.get("MOCE_WFA_FP32_PRECISION") or None,
                 cpu_malloc=env.get("MOCE_CPU_MALLOC") or None,
                 pwdw_warps=_int("MOCE_PWDW_WARPS", env.get("MOCE_PWDW_WARPS")),
                 wfa_one_shot_elems=_int("MOCE_WFA_ONE_SHOT_ELEMS", env.get("MOCE_WFA_ONE_SHOT_ELEMS")))
    for field, var in _FLAGS.items():
        setattr(s, field, _flag(env.get(var)))
    s.autotune = env.get("MOCE_AUTOTUNE", "1") not in ("", "0")
    return s


def on_change(fn: Callable[[Settings], None]) -> Callable[[Settings], None]:
    """Register ``fn(SETTINGS)``, called after every :func:`update` and :func:`reload`."""
    _LISTENERS.append(fn)
    return fn


def _notify() -> None:
    for fn in _LISTENERS:
        fn(SETTINGS)


def update(**values) -> Settings:
    """Set the named knobs (field names of :class:`Settings`); returns the previous settings, so that
    ``moce_kernels.settings.update(**dataclasses.asdict(previous))`` restores them."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join(f.name for f in dataclasses.fields(Settings))}")
    previous = dataclasses.replace(SETTINGS)
    for k, v in values.items():
        setattr(SETTINGS, k, v)
    _notify()
    return previous


def reload() -> Settings:
    """Read the environment again (e.g. after a test changed it); returns the previous settings."""
    return update(**dataclasses.asdict(from_environment()))


def variable(field: str) -> str:
    """The environment variable behind setting ``field``."""
    return {**_FLAGS, **_VALUES}[field]


for _k, _v in dataclasses.asdict(from_environment()).items():
    setattr(SETTINGS, _k, _v)
