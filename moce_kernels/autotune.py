"""Measured choice between implementations of an op: time each on the first call of a new key, keep
the fastest, reuse it, and remember it on disk per GPU and software versions.

The dispatcher calls :func:`choose` (or :meth:`Tuner.choose`) with the op, a key and the candidates::

    name = choose("channel_attention", ("channel_attention", "NVIDIA H200", ("bf16",), (1, 48, 256)),
                  [("reference", lambda: ref(*args)), ("triton", lambda: tri(*args))])

- ``key``: hashable, made of ``str``, ``int``, ``float``, ``bool``, ``None`` and tuples of them
  (by convention ``(op, device name, dtypes, shape class, ...)``); it is the table's entry.
- ``candidates``: ``(name, thunk)`` in order of preference, the reference first; each thunk runs
  that implementation on the real inputs and returns its output.

On a key it has not seen, the tuner times every candidate with its timer (default: CUDA events,
warm-up then a few repeats, the median; on a machine without CUDA, ``time.perf_counter``), skips
a candidate that raises (the reason is kept: :meth:`Tuner.failures`) and records the fastest. It
never times inside a CUDA graph capture: there it returns the first candidate and records nothing.
Switched off (:meth:`Tuner.disable`), it returns the first candidate. If every candidate fails it
returns the first one, unrecorded, so that the caller's own call reports the error.

The table is a JSON file per GPU name and versions (torch, triton, CUDA, moce_kernels) in
``$XDG_CACHE_HOME/moce_kernels/`` (default ``~/.cache/moce_kernels/``), read lazily once, written
atomically after each new entry; a corrupt file is ignored with a warning naming it.
:meth:`Tuner.table` returns the table (to commit under ``benchmarks/results/``), :meth:`Tuner.preseed`
takes one back (a dict or a JSON path), :meth:`Tuner.clear` forgets it. All methods are thread-safe.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ._files import write_atomic

Thunk = Callable[[], Any]
Timer = Callable[[Thunk], float]  # milliseconds per call of the thunk
Candidates = Sequence[Tuple[str, Thunk]]

TABLE_FORMAT = 1
WARMUP = 2
REPEATS = 5


# ---------------------------------------------------------------- timers
def cuda_event_timer(fn: Thunk, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_clock_timer(fn: Thunk, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median milliseconds of ``fn`` by ``time.perf_counter`` (for machines without CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def default_timer(fn: Thunk) -> float:
    """CUDA events where CUDA is available, else the wall clock."""
    return cuda_event_timer(fn) if torch.cuda.is_available() else wall_clock_timer(fn)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False where CUDA is not built in)."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AttributeError, AssertionError):
        return False


# ---------------------------------------------------------------- where the table lives
def cache_dir() -> str:
    """``$XDG_CACHE_HOME/moce_kernels`` (default ``~/.cache/moce_kernels``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "moce_kernels")


def device_name() -> str:
    """The current CUDA device's name, or ``"cpu"``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> Dict[str, Optional[str]]:
    """The versions a timing depends on besides the GPU: torch, triton, CUDA, moce_kernels."""
    try:
        import triton
        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    from . import __version__
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "moce_kernels": __version__}


def table_path(gpu: str, vers: Mapping[str, Optional[str]]) -> str:
    """The table file for ``gpu`` and versions ``vers`` in :func:`cache_dir`."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") or "device"
    digest = hashlib.sha256(json.dumps(dict(vers), sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"autotune-{slug}-{digest}.json")


# ---------------------------------------------------------------- keys in JSON
_SCALARS = (str, int, float, bool, type(None))


def _check_key(key: Any, where: str = "key") -> None:
    if isinstance(key, tuple):
        for i, part in enumerate(key):
            _check_key(part, f"{where}[{i}]")
    elif not isinstance(key, _SCALARS):
        raise TypeError(f"autotune {where} = {key!r} ({type(key).__name__}): keys are made of str, int, float, "
                        "bool, None and tuples of them (convert it, e.g. with str())")


def _to_json(key: Any) -> Any:
    return [_to_json(k) for k in key] if isinstance(key, tuple) else key


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------- the tuner
class Tuner:
    """Times the candidates of each new key once, keeps the fastest; see the module's docstring.

    ``path``: the table file (default: :func:`table_path` for this GPU and versions, decided at the
    first use); ``timer``: milliseconds of one call of a thunk (default :func:`default_timer`);
    ``persist``: read and write the file at all.
    """

    def __init__(self, path: "str | os.PathLike | None" = None, timer: Optional[Timer] = None,
                 persist: bool = True) -> None:
        self._path = os.fspath(path) if path is not None else None
        self._timer: Timer = timer or default_timer
        self._persist = persist
        self._enabled = True
        self._lock = threading.RLock()
        self._loaded = False
        self._choices: Dict[Any, str] = {}  # key -> chosen name: the hot path reads only this
        self._entries: Dict[Any, Dict[str, Any]] = {}  # key -> {"op", "choice", "times_ms", "errors"}
        self._failures: Dict[Any, Dict[str, str]] = {}  # key -> {name: reason}, also for unrecorded keys
        self._gpu: Optional[str] = None
        self._versions: Optional[Dict[str, Optional[str]]] = None

    # ------------------------------------------------------------ choosing
    def choose(self, op: str, key: Tuple, candidates: Candidates) -> str:
        """The name of the candidate to run for ``key`` (timing them all if ``key`` is new)."""
        if not candidates:
            raise ValueError(f"autotune {op}: no candidates to choose from")
        if not self._enabled:
            return candidates[0][0]
        if not self._loaded:
            self._load()
        choice = self._choices.get(key)
        if choice is not None:
            for name, _ in candidates:
                if name == choice:
                    return choice
        return self._tune(op, key, candidates)

    def _tune(self, op: str, key: Tuple, candidates: Candidates) -> str:
        _check_key(key)
        if capturing():
            return candidates[0][0]
        with self._lock:
            choice = self._choices.get(key)  # another thread may have tuned it meanwhile
            if choice is not None and any(name == choice for name, _ in candidates):
                return choice
            times, errors = self._time_all(candidates)
            self._failures[key] = errors
            if not times:
                return candidates[0][0]
            best = min(times, key=times.__getitem__)  # ties: the earlier candidate
            self._entries[key] = {"op": op, "choice": best, "times_ms": times, "errors": errors}
            self._choices[key] = best
            self._save()
            return best

    def _time_all(self, candidates: Candidates) -> Tuple[Dict[str, float], Dict[str, str]]:
        times: Dict[str, float] = {}
        errors: Dict[str, str] = {}
        for name, thunk in candidates:
            try:
                ms = float(self._timer(thunk))
            except Exception as e:  # a candidate that cannot run these inputs is skipped, with its reason
                errors[name] = _error_text(e)
                continue
            if math.isfinite(ms) and ms >= 0:
                times[name] = ms
            else:
                errors[name] = f"the timer measured {ms!r} ms"
        return times, errors

    # ------------------------------------------------------------ switches and reading
    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        """Time new keys and reuse what was measured (the default)."""
        self._enabled = True

    def disable(self) -> None:
        """:meth:`choose` returns the first candidate, times nothing and reads no file."""
        self._enabled = False

    def failures(self, key: Tuple) -> Dict[str, str]:
        """``{candidate: reason}`` for the candidates that raised when ``key`` was timed."""
        with self._lock:
            return dict(self._failures.get(key, {}))

    def table(self) -> Dict[str, Any]:
        """The table, JSON-ready: ``{"format", "gpu", "versions", "entries": [{"op", "key", "choice",
        "times_ms", "errors"}, ...]}`` (what the file holds)."""
        if not self._loaded:
            self._load()
        with self._lock:
            entries = [dict(e, key=_to_json(k)) for k, e in self._entries.items()]
            return {"format": TABLE_FORMAT, "gpu": self._gpu, "versions": self._versions, "entries": entries}

    @property
    def path(self) -> Optional[str]:
        """The table file (None until the first use decides it, or when not persisting)."""
        return self._path if self._persist else None

    # ------------------------------------------------------------ seeding and clearing
    def preseed(self, source: "Mapping[Any, Any] | str | os.PathLike") -> int:
        """Add entries from a table (as :meth:`table` returns, or a JSON file of one) or from a plain
        ``{key: name}`` mapping; they replace measured entries of the same keys and are written to the
        table file. Returns the number of entries added. The versions of a seeded table are not
        checked: seeding is a deliberate choice."""
        if isinstance(source, (str, os.PathLike)):
            with open(source, encoding="utf-8") as f:
                source = json.load(f)
        entries = self._parse(source, origin="preseed")
        if not self._loaded:
            self._load()
        with self._lock:
            for key, entry in entries.items():
                self._entries[key] = entry
                self._choices[key] = entry["choice"]
            self._save()
        return len(entries)

    def clear(self) -> None:
        """Forget every entry and failure, and remove the table file."""
        with self._lock:
            self._choices.clear()
            self._entries.clear()
            self._failures.clear()
            self._loaded = True
            path = self.path
            if path is not None and os.path.exists(path):
                os.remove(path)

    # ------------------------------------------------------------ the file
    def _identify(self) -> None:
        if self._gpu is None:
            self._gpu, self._versions = device_name(), versions()
        if self._path is None and self._persist:
            self._path = table_path(self._gpu, self._versions)

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._identify()
            path = self.path
            if path is not None and os.path.exists(path):
                self._read(path)
            self._loaded = True

    def _read(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            entries = self._parse(data, origin=path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as e:
            warnings.warn(f"autotune table {path} is unreadable and is ignored (it is replaced at the next "
                          f"measurement): {_error_text(e)}", RuntimeWarning, stacklevel=4)
            return
        if data.get("gpu") != self._gpu or data.get("versions") != self._versions:
            return  # measured elsewhere: not this table
        for key, entry in entries.items():
            self._entries[key] = entry
            self._choices[key] = entry["choice"]

    @staticmethod
    def _parse(data: Any, origin: str) -> Dict[Any, Dict[str, Any]]:
        """Entries by key from a table dict or a plain ``{key: name}`` mapping (ValueError if malformed)."""
        if isinstance(data, Mapping) and "entries" in data:
            if data.get("format") != TABLE_FORMAT or not isinstance(data["entries"], list):
                raise ValueError(f"{origin}: not an autotune table of format {TABLE_FORMAT}")
            out = {}
            for e in data["entries"]:
                if not (isinstance(e, Mapping) and isinstance(e.get("choice"), str) and "key" in e):
                    raise ValueError(f"{origin}: malformed entry {e!r}")
                key = _from_json(e["key"])
                _check_key(key)
                out[key] = {"op": e.get("op"), "choice": e["choice"], "times_ms": dict(e.get("times_ms") or {}),
                            "errors": dict(e.get("errors") or {})}
            return out
        if isinstance(data, Mapping):
            out = {}
            for key, name in data.items():
                _check_key(key)
                if not isinstance(name, str):
                    raise ValueError(f"{origin}: the choice for {key!r} must be a candidate's name, got {name!r}")
                op = key[0] if isinstance(key, tuple) and key and isinstance(key[0], str) else None
                out[key] = {"op": op, "choice": name, "times_ms": {}, "errors": {}}
            return out
        raise ValueError(f"{origin}: expected an autotune table or a {{key: name}} mapping, got {type(data).__name__}")

    def _save(self) -> None:
        path = self.path
        if path is None:
            return
        entries = [dict(e, key=_to_json(k)) for k, e in self._entries.items()]
        data = {"format": TABLE_FORMAT, "gpu": self._gpu, "versions": self._versions, "entries": entries}
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError as e:
            warnings.warn(f"autotune table {path} cannot be written ({_error_text(e)}); the measurements are "
                          "kept for this process only", RuntimeWarning, stacklevel=4)
            self._persist = False


DEFAULT = Tuner()


def choose(op: str, key: Tuple, candidates: List[Tuple[str, Thunk]]) -> str:
    """:meth:`Tuner.choose` of the process-wide :data:`DEFAULT` tuner."""
    return DEFAULT.choose(op, key, candidates)


def _plain(part: Any) -> Any:
    """A part of a dispatch key as the table keeps it: dtypes by name, shapes and tuples as tuples."""
    if isinstance(part, torch.dtype):
        return str(part).removeprefix("torch.")
    if isinstance(part, (tuple, list, torch.Size)):
        return tuple(_plain(p) for p in part)
    if part is None or isinstance(part, (str, int, float, bool)):
        return part
    return str(part)


def dispatch_chooser(op: str, key: Tuple, candidates: List[Tuple[str, Thunk]]) -> str:
    """``auto``'s chooser on CUDA (installed by :mod:`moce_kernels.backends`): the dispatcher's memo key
    (backend choice, device type, dtypes, shape class) in the table's form, then :func:`choose`."""
    return DEFAULT.choose(op, (op,) + _plain(key), candidates)
