"""CPU runtimes side by side: MoCE-IR-S, eager PyTorch (the reference path) vs its ONNX export in ONNX
Runtime and OpenVINO, plus the export time.

    python benchmarks/bench_runtimes.py [--size 256] [--batch 1] [--rounds 5] [--json out.json]

One process, one input: the three run alternately (eager, ONNX Runtime, OpenVINO) for ``--rounds``
rounds after one warm-up each; the median of each is reported with its ratio to eager and the largest
difference from the eager output. Random weights (seed 0), eval mode, fp32, no gradients.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

from moce_kernels import MoCEIR, export_onnx
from moce_kernels.onnx.runtime import OnnxTileRunner


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import openvino
    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__}


def _time(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="MoCE_IR_S")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = MoCEIR.from_preset(args.preset).eval()
    x = torch.rand(args.batch, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        start = time.perf_counter()
        export_onnx(model, path)
        export_s = time.perf_counter() - start
        runners = {"onnxruntime": OnnxTileRunner(path, "onnxruntime"), "openvino": OnnxTileRunner(path, "openvino")}
    with torch.no_grad():
        fns = {"eager (reference)": lambda: model(x), **{k: (lambda r=r: r(x)) for k, r in runners.items()}}
        outs = {name: fn() for name, fn in fns.items()}  # warm-up, and the outputs compared
        times: Dict[str, List[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(_time(fn))
    eager = statistics.median(times["eager (reference)"])
    rows = []
    for name in fns:
        med = statistics.median(times[name])
        rows.append({"runtime": name, "median_s": med, "speedup_vs_eager": eager / med,
                     "max_abs_diff_vs_eager": float((outs[name] - outs["eager (reference)"]).abs().max()),
                     "times_s": times[name]})
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "preset": args.preset, "size": args.size, "batch": args.batch, "dtype": "float32",
              "rounds": args.rounds, "export_s": export_s, "cpu": _cpu_name(), "cores": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "versions": _versions(), "results": rows}
    print(f"{args.preset} {args.size}x{args.size} batch {args.batch} fp32, {result['cpu']}, "
          f"load {result['load_average'][0]:.1f}; export {export_s:.1f} s")
    print(f"{'runtime':<20} {'median s':>9} {'vs eager':>9} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['runtime']:<20} {r['median_s']:>9.3f} {r['speedup_vs_eager']:>8.2f}x "
              f"{r['max_abs_diff_vs_eager']:>11.2e}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
