"""Benchmarks: without a GPU, Triton would only run in its interpreter, which is never timed."""
from __future__ import annotations

from typing import Any


def _figure(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print every benchmark's figures (its ``extra_info``: milliseconds, megapixels/s, ratios, counts) at
    the end of the run, so the main job's output holds the numbers the README quotes, not only
    ``--benchmark-json``."""
    session = getattr(config, "_benchmarksession", None)
    rows = [(b.fullname, b.extra_info) for b in getattr(session, "benchmarks", []) if getattr(b, "extra_info", None)]
    if not rows:
        return
    terminalreporter.section("benchmark figures (extra_info)")
    for name, info in rows:
        shown = ", ".join(f"{k}={_figure(v)}" for k, v in info.items() if isinstance(v, (int, float, str, bool)))
        terminalreporter.write_line(f"{name}: {shown}")
