"""Host cost of one MoCE-IR forward: Python calls and host microseconds, three paths side by side.

Run: ``pytest benchmarks/bench_host.py --benchmark-only`` (part of the main job). MoCE-IR, batch 1,
fp32, eval, no gradients, at 64 and 256 px, on CPU tensors:

- ``default``: the default backend choice (on a CPU every op runs its reference).
- ``triton, launches stubbed``: backend ``triton`` with every Triton launch replaced below Triton's
  launcher: ``JITFunction.run`` binds the launch's arguments by name (``dict(zip(arg_names, args))``
  plus the keywords) and evaluates the grid, then returns without compiling, specialising or
  launching (Triton's own binder, cache lookup and driver call are what is left out; nothing runs,
  so the kernels' outputs are whatever the allocator gave). The triton backend is made to accept CPU
  tensors as under ``TRITON_INTERPRET`` (``backends.triton_interpreted``) after its kernels are
  imported (their constants are the GPU's). Every host-side step of the GPU path runs: op checks,
  dispatch, the expert-stage plan, meta tables, buffer allocation, grids. Its wall time also holds
  the CPU compute of the few plain torch ops outside this package's ops (3x3 convolutions, pixel
  shuffles, pads), which on a GPU are asynchronous launches.
- ``authors``: the authors' eager model (``MOCE_AUTHORS_CODE=/path/moce_ir.py``, their file, kept
  outside this repository) with the same weights; skipped without it.

Each path: one warm-up forward, ``FORWARDS`` timed forwards (the median is reported), then one
forward under ``cProfile`` (built-in calls included) for the call counts. The table is printed and
each figure recorded in ``extra_info``.
"""
from __future__ import annotations

import contextlib
import cProfile
import importlib
import os
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

import pytest
import torch

import moce_kernels
from moce_kernels import MoCEIR

sys.path.insert(0, os.path.dirname(__file__))
from bench_model import _authors_module  # noqa: E402

FORWARDS = 2
PRESET = "MoCE_IR"
RESULTS: Dict[int, Dict[str, Dict[str, float]]] = {}


@contextlib.contextmanager
def triton_launches_stubbed() -> Iterator[Optional[str]]:
    """Within: Triton launches bind their arguments and return (see the module docstring). Yields
    None, or why the stub cannot be installed here."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        yield "TRITON_INTERPRET is set: the kernels are interpreted functions, not Triton's launcher"
        return
    try:
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        yield f"triton is not importable ({e})"
        return
    from moce_kernels import backends
    importlib.import_module("moce_kernels.triton")  # the kernels read their constants at import
    saved_run, saved_interp = JITFunction.run, getattr(backends, "triton_interpreted", None)
    if saved_interp is None:
        yield "moce_kernels.backends has no triton_interpreted() to let the triton backend take CPU tensors"
        return

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        if callable(grid):
            grid(bound)
        return None

    JITFunction.run = run
    backends.triton_interpreted = lambda: True
    backends._on_settings(None)  # forget the availability and choices found without the stub
    try:
        yield None
    finally:
        JITFunction.run = saved_run
        backends.triton_interpreted = saved_interp
        backends._on_settings(None)


def count_calls(forward: Callable[[], object], warmups: int = 1) -> int:
    """cProfile's calls (built-ins included) of one ``forward()`` after ``warmups`` unprofiled ones:
    deterministic for a given model, input and set of installed packages."""
    for _ in range(warmups):
        forward()
    prof = cProfile.Profile()
    prof.enable()
    forward()
    prof.disable()
    return sum(ncalls for _, ncalls, *_rest in pstats.Stats(prof).stats.values())


def measure(forward: Callable[[], object]) -> Dict[str, float]:
    """Host microseconds (median of FORWARDS, after a warm-up) and cProfile's calls of one forward,
    with the calls in this package's expert stage and blocks and in importlib / os frames."""
    forward()
    times = []
    for _ in range(FORWARDS):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    prof = cProfile.Profile()
    prof.enable()
    forward()
    prof.disable()
    stats = pstats.Stats(prof).stats
    by_file: Dict[str, int] = {}
    for (filename, _, _), (_, ncalls, *_rest) in stats.items():
        by_file[filename] = by_file.get(filename, 0) + ncalls
    part = lambda *keys: sum(n for f, n in by_file.items() if any(k in f for k in keys))  # noqa: E731
    return {"host_us": statistics.median(times) * 1e6, "calls": sum(by_file.values()),
            "calls_expert_stage": part(os.path.join("moce_kernels", "expert_stage")),
            "calls_blocks": part(os.path.join("moce_kernels", "model", "blocks.py")),
            "calls_importlib": part("importlib"), "calls_os": part(os.sep + "os.py")}


def _forward(model: torch.nn.Module, x: torch.Tensor, backend: Optional[str]) -> Callable[[], object]:
    def run():
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if backend is not None:
                stack.enter_context(moce_kernels.backend(backend))
            return model(x)
    return run


def _authors(ours: MoCEIR) -> Tuple[Optional[torch.nn.Module], str]:
    """The authors' model with our weights, or None and why not."""
    try:
        mod = _authors_module()
    except ImportError as e:  # their file's own imports (einops, ...)
        return None, f"the authors' file does not import: {e}"
    if mod is None:
        return None, "set MOCE_AUTHORS_CODE to the authors' moce_ir.py"
    from moce_kernels.model.presets import preset_config
    theirs = mod.MoCEIR(**preset_config(PRESET)).eval()
    theirs.load_state_dict(ours.state_dict())
    for m in theirs.modules():
        if hasattr(m, "noise_std"):
            m.noise_std = 0.0  # deterministic routing, as ours in eval
    return theirs, ""


def _table(px: int, rows: Dict[str, Dict[str, float]], notes: Dict[str, str]) -> str:
    lines = [f"\nHost cost of one {PRESET} forward, {px} x {px}, batch 1, fp32, CPU tensors:",
             "| path | Python calls | host us | expert_stage calls | blocks calls | importlib | os |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['calls']:,} | {r['host_us']:,.0f} | {r['calls_expert_stage']:,} | "
                     f"{r['calls_blocks']:,} | {r['calls_importlib']:,} | {r['calls_os']:,} |")
    lines += [f"| {name} | skipped: {why} | | | | | |" for name, why in notes.items()]
    return "\n".join(lines)


@pytest.mark.parametrize("px", [64, 256])
def test_host_cost(benchmark, capsys, px):
    torch.manual_seed(0)
    model = MoCEIR.from_preset(PRESET).eval()
    x = torch.rand(1, 3, px, px)
    rows: Dict[str, Dict[str, float]] = {}
    notes: Dict[str, str] = {}
    rows["default"] = measure(_forward(model, x, None))
    with triton_launches_stubbed() as why:
        if why is None:
            rows["triton, launches stubbed"] = measure(_forward(model, x, "triton"))
        else:
            notes["triton, launches stubbed"] = why
    theirs, why = _authors(model)
    if theirs is not None:
        rows["authors"] = measure(_forward(theirs, x, None))
    else:
        notes["authors"] = why
    RESULTS[px] = rows
    with capsys.disabled():
        print(_table(px, rows, notes))
    benchmark.extra_info.update(preset=PRESET, px=px, forwards=FORWARDS,
                                **{f"{name}.{k}": v for name, r in rows.items() for k, v in r.items()},
                                skipped=notes)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
