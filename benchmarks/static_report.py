"""Compile every Triton kernel the ops launch for sm_90 *without a GPU* and report its resources.

METHOD.md: "the compiler's resource report and the disassembly answer most questions" and cost no
device time. This script runs the ops' Triton launchers on CPU tensors at the benchmark shapes, but
with a fake driver whose target is an H100/H200 (sm_90): every launch is compiled (as on the GPU,
same constexprs, num_warps, num_stages) and *not run*. For each compiled kernel it prints registers,
spill/local bytes, shared memory and static SASS instruction counts (tensor-core ops, global load
widths, local-memory traffic, barriers), read from the cubin with Triton's own cuobjdump/nvdisasm.

Usage:  python benchmarks/static_report.py [--json FILE] [--family window_attention|expert_conv|norm_conv|
        channel_attention|model]
Outputs from the kernels are meaningless (nothing runs); only the compilation is real.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, never interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class _FakeDriver:
    """Just enough of a Triton driver to compile for sm_90 on a machine without a GPU."""

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int = 0) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):  # used only by autotuning / benchmarking paths
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("static report: nothing is timed")


RECORDS: List[Dict[str, Any]] = []
_SEEN: set = set()


def _sass_stats(cubin: bytes) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(_TOOLS / "cuobjdump"), "-res-usage", str(path)], capture_output=True,
                             text=True).stdout
        sass = subprocess.run([str(_TOOLS / "nvdisasm"), "-c", str(path)], capture_output=True, text=True).stdout
    usage = {}
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m:
        usage = dict(zip(("regs", "stack", "shared_static", "local"), map(int, m.groups())))
    ops = Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)", line)
        if not m:
            continue
        op = m.group(1)
        base = op.split(".")[0]
        if base in ("HMMA", "HGMMA", "IMMA", "DMMA", "BAR", "LDL", "STL", "LDS", "STS", "LDSM", "FFMA", "MUFU",
                    "SHFL", "ATOMG", "RED", "REDG", "ATOM"):
            ops[base] += 1
        if base in ("LDG", "STG"):
            width = next((w for w in ("128", "64") if f".{w}" in op), "32-")
            ops[f"{base}.{width}"] += 1
        ops["total"] += 1
    return {**usage, "sass": dict(ops)}


def _record_compile(fn: JITFunction, args, kwargs, compiled) -> None:
    constexprs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    key = (fn.__name__, repr(sorted((k, str(v)) for k, v in constexprs.items())))
    if key in _SEEN:
        return
    _SEEN.add(key)
    meta = compiled.metadata
    rec = {"kernel": fn.__name__, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
           "shared": meta.shared, "constexprs": {k: v for k, v in constexprs.items()
                                                  if isinstance(v, (int, bool, str, float))}}
    ttgir = compiled.asm.get("ttgir", "")
    rec["dots"] = ttgir.count("tt.dot ") + ttgir.count("warp_group_dot ")
    rec.update(_sass_stats(compiled.asm["cubin"]))
    RECORDS.append(rec)


def install() -> None:
    """Route every Triton launch to compile-only for sm_90."""
    _driver.set_active(_FakeDriver())
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        compiled = original(self, *args, grid=grid, warmup=True, **kwargs)
        if compiled is not None:
            _record_compile(self, args, kwargs, compiled)
        return compiled

    JITFunction.run = run
    # Nothing runs, so kernel outputs keep what the allocator gave them; zero-fill every allocation so
    # that host code which indexes with a kernel's output (e.g. a permutation) sees valid indices.
    _empty, _empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: _empty(*a, **k).zero_()
    torch.empty_like = lambda *a, **k: _empty_like(*a, **k).zero_()
    import moce_kernels.backends as backends
    backends._load("triton")  # import the kernels first: they read triton_interpreted() at import
    backends.triton_interpreted = lambda: True  # then let the triton backend accept CPU tensors


def _rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype)


def window_attention_cases(dtype: torch.dtype) -> List[Callable[[], Any]]:
    from moce_kernels import ops
    cases = []
    for (B, C, H, W, p) in [(8, 6, 256, 256, 4), (8, 12, 256, 256, 8), (8, 48, 128, 128, 8), (8, 24, 256, 256, 16),
                            (8, 192, 64, 64, 32), (8, 48, 256, 256, 32)]:
        def fwd_bwd(B=B, C=C, H=H, W=W, p=p):
            q, k, v = (_rand(B, C, H, W, dtype=dtype).requires_grad_() for _ in range(3))
            w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
            out = ops.window_fft_attention(q, k, v, p, w, b)
            out.backward(torch.randn_like(out))
        cases.append(fwd_bwd)
    return cases


def expert_conv_cases(dtype: torch.dtype) -> List[Callable[[], Any]]:
    from moce_kernels import ops
    cases = []
    for (cin, cout, k, gated) in [(96, 288, 3, False), (96, 192, 7, False), (96, 384, 3, True)]:
        def fwd_bwd(cin=cin, cout=cout, k=k, gated=gated):
            x = _rand(8, cin, 128, 128, dtype=dtype).requires_grad_()
            pw = (_rand(cout, cin, 1, 1, dtype=dtype) * 0.1).requires_grad_()
            dw = (_rand(cout, 1, k, k, dtype=dtype) * 0.1).requires_grad_()
            fn = ops.pointwise_depthwise_conv_gated if gated else ops.pointwise_depthwise_conv
            out = fn(x, pw, dw)
            out.backward(torch.randn_like(out))
        cases.append(fwd_bwd)
    return cases


def norm_conv_cases(dtype: torch.dtype) -> List[Callable[[], Any]]:
    """The LayerNorm-folded trunk ops at MoCE-IR's first level (C = 48): MDTA's qkv (WithBias), GDFN's
    gated input (BiasFree, to compile both folds), the decoder's two projections, a projection + residual."""
    from moce_kernels import ops
    C, H, W = 48, 128, 128

    def run(fn, *shapes) -> None:
        x = _rand(8, C, H, W, dtype=dtype).requires_grad_()
        ts = [(_rand(*s, dtype=dtype) * 0.1).requires_grad_() if s else None for s in shapes]
        out = fn(x, *ts)
        out = torch.stack(out) if isinstance(out, tuple) else out
        out.backward(torch.randn_like(out))

    return [lambda: run(ops.layer_norm_pointwise_depthwise_conv, (C,), (C,), (3 * C, C, 1, 1), (3 * C, 1, 3, 3)),
            lambda: run(ops.layer_norm_pointwise_depthwise_conv_gated, (C,), None, (4 * C, C, 1, 1),
                        (4 * C, 1, 3, 3), (4 * C,), (4 * C,)),
            lambda: run(lambda x, w, b, pw, pb: ops.layer_norm_pointwise_conv(x, w, b, pw, pb, chunks=2),
                        (C,), (C,), (2 * C, C, 1, 1), (2 * C,)),
            lambda: run(ops.pointwise_conv, (C, C, 1, 1), (C,), (8, C, H, W))]


def channel_attention_cases(dtype: torch.dtype) -> List[Callable[[], Any]]:
    """Channel attention with projection and residual at the models' head widths: c = 32 (MoCE-IR-S,
    tile 32) and c = 48 (MoCE-IR, tile 64), one head (level 1) and eight (level 4)."""
    from moce_kernels import ops
    cases = []
    for (c, heads) in [(32, 1), (32, 8), (48, 1), (48, 8)]:
        def fwd_bwd(C=c * heads, heads=heads):
            q, k, v = (_rand(8, C, 64, 64, dtype=dtype).requires_grad_() for _ in range(3))
            t = torch.ones(heads, 1, 1, dtype=dtype, requires_grad=True)
            w = (_rand(C, C, 1, 1, dtype=dtype) * 0.1).requires_grad_()
            b, res = torch.zeros(C, dtype=dtype, requires_grad=True), _rand(8, C, 64, 64, dtype=dtype)
            out = ops.channel_attention(q, k, v, t, w, b, res)
            out.backward(torch.randn_like(out))
        cases.append(fwd_bwd)
    return cases


def model_cases(dtype: torch.dtype) -> List[Callable[[], Any]]:
    from moce_kernels import MoCEIR

    def fwd_bwd():
        torch.manual_seed(0)
        model = MoCEIR.from_preset("MoCE_IR_S").to(dtype)
        x = torch.rand(2, 3, 64, 64, dtype=dtype)
        model.train()
        out = model(x)
        (out.float().mean() + model.total_loss).backward()
    return [fwd_bwd]


FAMILIES = {"window_attention": window_attention_cases, "expert_conv": expert_conv_cases, "norm_conv": norm_conv_cases,
            "channel_attention": channel_attention_cases, "model": model_cases}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    install()
    from moce_kernels.backends import backend
    dtype = getattr(torch, args.dtype)
    for family in args.family or ["window_attention", "expert_conv"]:
        with backend("triton"):
            for case in FAMILIES[family](dtype):
                try:
                    case()
                except (RuntimeError, IndexError) as e:  # host code indexing with never-computed outputs
                    print(f"note: {family} case stopped after {len(RECORDS)} kernels: {str(e).splitlines()[0]}")
    cols = ("regs", "local", "stack", "shared", "num_warps")
    print(f"{'kernel':28s} {'key constexprs':44s} " + " ".join(f"{c:>7s}" for c in cols)
          + "  HMMA HGMMA LDG.128 LDG.32- LDL STL BAR")
    for r in RECORDS:
        ce = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k.isupper() and not isinstance(v, bool))
        s = r.get("sass", {})
        print(f"{r['kernel'][:28]:28s} {ce[:44]:44s} " + " ".join(f"{r.get(c, '-')!s:>7s}" for c in cols)
              + f"  {s.get('HMMA', 0):4d} {s.get('HGMMA', 0):5d} {s.get('LDG.128', 0):7d} {s.get('LDG.32-', 0):7d}"
              + f" {s.get('LDL', 0):3d} {s.get('STL', 0):3d} {s.get('BAR', 0):3d}")
    if args.json:
        args.json.write_text(json.dumps(RECORDS, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
