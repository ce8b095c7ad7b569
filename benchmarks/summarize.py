"""Summarise pytest-benchmark JSON files of a GPU run as markdown tables (the end of a device run's
output is what comes back first, so gpu_run.sh prints this last).

Usage: python benchmarks/summarize.py DIR_OR_JSON [...]
One row per case (the test name without its backend), one column per backend: median ms from
``extra_info["ms"]`` (do_bench), then each backend's speed-up over ``reference`` and, where recorded,
its fraction of the memory roofline.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections import OrderedDict
from typing import Dict, List


def _load(paths: List[str]) -> Dict[str, list]:
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*.json"))) if os.path.isdir(p) else [p]
    out: Dict[str, list] = {}
    for f in files:
        try:
            with open(f) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        if "benchmarks" in data:
            out[os.path.basename(f)] = data["benchmarks"]
    return out


def _case_and_backend(bench: dict) -> tuple:
    info = bench.get("extra_info", {})
    backend = info.get("backend", "?")
    name = bench["name"]
    params = re.sub(r"^[^\[]*\[|\]$", "", name).split("-")
    case = "-".join(p for p in params if p != backend)
    return f"{name.split('[')[0]}[{case}]", backend


def table(benchmarks: list) -> str:
    rows: "OrderedDict[str, Dict[str, dict]]" = OrderedDict()
    backends: List[str] = []
    for b in benchmarks:
        info = b.get("extra_info", {})
        if "ms" not in info:
            continue
        case, backend = _case_and_backend(b)
        rows.setdefault(case, {})[backend] = info
        if backend not in backends:
            backends.append(backend)
    if not rows:
        return "(no GPU timings)\n"
    head = ["case"] + [f"{be} ms" for be in backends] + [f"{be} speed-up" for be in backends if be != "reference"]
    head += [f"{be} roofline" for be in backends]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, by in rows.items():
        ref = by.get("reference", {}).get("ms")
        cells = [case] + [f"{by[be]['ms']:.3f}" if be in by else "" for be in backends]
        cells += [f"{ref / by[be]['ms']:.2f}x" if be in by and ref else "" for be in backends if be != "reference"]
        cells += [f"{by[be]['roofline_fraction']:.0%}" if be in by and "roofline_fraction" in by[be] else ""
                  for be in backends]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> None:
    for name, benchmarks in _load(argv or ["."]).items():
        print(f"\n### {name}\n")
        print(table(benchmarks))


if __name__ == "__main__":
    main(sys.argv[1:])
