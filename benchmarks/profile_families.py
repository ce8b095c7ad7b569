"""Where the time of a whole MoCE-IR forward goes: kernel time per op family, then the whole model
four ways, in one run. ``bash benchmarks/gpu_run.sh profile`` runs it on a GPU (the first phase of
``verify``); it also runs on a CPU, where it reports CPU op time instead of kernel time.

    python3 benchmarks/profile_families.py --out DIR [--preset MoCE_IR] [--dtype bf16]
                                           [--cases 256x1,512x8] [--budget-s 330]

1. **Profile** (torch.profiler, one forward after warm-up, backend ``auto``): every CUDA kernel is
   charged to an op family by the op that launched it: one of this package's ops (by name), a
   convolution (by weight shape: 1x1, depthwise, other), or the module range it ran in (LayerNorm,
   channel attention, routing; :mod:`moce_kernels.census`). Kernel time and kernel count per family.
2. **Whole model**: the median forward time of the reference backend in eager mode, ``torch.compile`` of
   the reference (the authors' math visible to Inductor: ``benchmarks/_baselines.py``), the default eager
   path (``auto``) and ``moce_kernels.optimize``.
   Compilation is timed separately. Variants are skipped, and said to be, once the time budget is spent.
Writes ``profile.json`` and ``profile.md`` (device, versions, tables) under ``--out``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import moce_kernels  # noqa: E402
from moce_kernels import MoCEIR, census, nvtx  # noqa: E402
from _baselines import compile_reference  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- attribution
def _ancestors(evt) -> List[Any]:
    out = []
    while evt is not None:
        out.append(evt)
        evt = evt.cpu_parent
    return out


def _our_op(name: str) -> Optional[str]:
    """``moce::op`` for a profiler event of one of our ops (the dispatcher op or its ``op[backend]`` range)."""
    if name.startswith("moce::"):
        return name
    if name.endswith("]") and "[" in name and name.split("[")[0] in census.OP_FAMILIES:
        return "moce::" + name.split("[")[0]
    return None


def event_family(evt) -> str:
    """The op family a profiler event (and the kernels it launched) belongs to."""
    chain = _ancestors(evt)
    for e in chain:
        op = _our_op(e.name)
        if op is not None:
            return census.family_of(op, None)
    for e in chain:
        if e.name == "aten::convolution" and e.input_shapes and len(e.input_shapes) > 1 and e.input_shapes[1]:
            return census.conv_family(e.input_shapes[1])
    for e in chain:
        if e.name in census.MODULE_FAMILIES:  # a module's record_function range (moce_kernels.nvtx)
            return census.MODULE_FAMILIES[e.name]
    return "other"


def _kernel_us(k) -> float:
    return float(getattr(k, "duration", 0.0) or 0.0)


def profile_forward(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """{family: {"ms": time, "kernels": count}} for one forward (GPU: kernel time; CPU: self CPU time)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if GPU else [])
    nvtx.record_functions(True)
    try:
        with torch.no_grad():
            for _ in range(2):
                model(x)
            _sync()
            with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
                model(x)
                _sync()
    finally:
        nvtx.record_functions(False)
    fams: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: {"ms": 0.0, "kernels": 0})
    for evt in prof.events():
        if GPU:
            kernels = list(getattr(evt, "kernels", []) or [])
            if kernels:
                f = fams[event_family(evt)]
                f["ms"] += sum(_kernel_us(k) for k in kernels) / 1e3
                f["kernels"] += len(kernels)
        elif not evt.cpu_children and evt.name.startswith(("aten::", "moce::")):
            f = fams[event_family(evt)]
            f["ms"] += evt.self_cpu_time_total / 1e3
            f["kernels"] += 1
    return dict(fams)


# ----------------------------------------------------------------------------- timing
def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any]) -> float:
    if GPU:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def _variants(model: torch.nn.Module) -> List[Tuple[str, str, Callable[[], Callable]]]:
    """(name, backend, builder) of the four whole-model variants; builders return the callable to time."""
    return [
        ("reference eager", "reference", lambda: model),
        ("torch.compile(reference)", "reference", lambda: compile_reference(model)),
        ("moce_kernels eager (auto)", "auto", lambda: model),
        ("moce_kernels.optimize()", "auto", lambda: moce_kernels.optimize(model)),
    ]


def time_variants(model: torch.nn.Module, x: torch.Tensor, deadline: float) -> List[Dict[str, Any]]:
    rows = []
    for name, backend, build in _variants(model):
        if time.monotonic() > deadline:
            rows.append({"variant": name, "skipped": "time budget spent"})
            continue
        with moce_kernels.backend(backend), torch.no_grad():
            t0 = time.perf_counter()
            fn = build()
            out = fn(x)  # compilation, autotuning, CUDA-graph capture
            _sync()
            setup_s = time.perf_counter() - t0
            ms = median_ms(lambda: fn(x))
        rows.append({"variant": name, "ms": ms, "first_call_s": setup_s, "finite": bool(torch.isfinite(out).all())})
    base = next((r["ms"] for r in rows if r["variant"] == "reference eager" and "ms" in r), None)
    comp = next((r["ms"] for r in rows if r["variant"] == "torch.compile(reference)" and "ms" in r), None)
    for r in rows:
        if "ms" in r:
            r["x_vs_reference_eager"] = base / r["ms"] if base else None
            r["x_vs_compiled_reference"] = comp / r["ms"] if comp else None
    return rows


# ----------------------------------------------------------------------------- report
def environment() -> Dict[str, Any]:
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "device": torch.cuda.get_device_name(0) if GPU else platform.processor()
            or platform.machine(), "backends": moce_kernels.available_backends()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def markdown(report: Dict[str, Any]) -> str:
    env = report["environment"]
    unit = "kernel" if GPU else "CPU op"
    lines = [f"# Whole-model profile, {env['date']}", "",
             f"{env['device']}; torch {env['torch']}, CUDA {env['cuda']}, Triton {env['triton']}; "
             f"{report['preset']} {report['dtype']}, random weights, eval, backend auto.", ""]
    for case in report["cases"]:
        fams = case["families"]
        total = sum(f["ms"] for f in fams.values()) or 1.0
        lines += [f"## {case['size']} px, batch {case['batch']}", "",
                  f"| family | {unit} ms | share | {unit}s |", "|---|---:|---:|---:|"]
        for name, f in sorted(fams.items(), key=lambda kv: -kv[1]["ms"]):
            lines.append(f"| {name} | {f['ms']:.3f} | {100 * f['ms'] / total:.1f} % | {int(f['kernels'])} |")
        lines.append(f"| **all** | **{total:.3f}** | | **{int(sum(f['kernels'] for f in fams.values()))}** |")
        lines += ["", "| variant | ms | x reference eager | x torch.compile(reference) | first call s |",
                  "|---|---:|---:|---:|---:|"]
        for r in case["variants"]:
            if "ms" not in r:
                lines.append(f"| {r['variant']} | skipped ({r['skipped']}) | | | |")
                continue
            fx = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
            lines.append(f"| {r['variant']} | {r['ms']:.3f} | {fx(r['x_vs_reference_eager'])} | "
                         f"{fx(r['x_vs_compiled_reference'])} | {r['first_call_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="MoCE_IR", choices=["MoCE_IR", "MoCE_IR_S"])
    ap.add_argument("--dtype", default="bf16" if GPU else "fp32", choices=sorted(DTYPES))
    ap.add_argument("--cases", default="256x1,512x8" if GPU else "64x1", help="SIZExBATCH, comma-separated")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new variants after this")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = MoCEIR.from_preset(args.preset).eval().to(DEVICE, dtype)
    report: Dict[str, Any] = {"environment": environment(), "preset": args.preset, "dtype": args.dtype, "cases": []}
    for case in args.cases.split(","):
        size, batch = (int(v) for v in case.split("x"))
        x = torch.rand(batch, 3, size, size, device=DEVICE, dtype=dtype)
        fams = profile_forward(model, x)
        report["cases"].append({"size": size, "batch": batch, "families": fams,
                                "census_ops": census.census(model, x).total_ops})
    for case in report["cases"]:
        x = torch.rand(case["batch"], 3, case["size"], case["size"], device=DEVICE, dtype=dtype)
        case["variants"] = time_variants(model, x, deadline)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
