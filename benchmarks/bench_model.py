"""Whole-model speed: MoCE-IR and MoCE-IR-S per backend, reporting megapixels/s, and the op census.

Run: ``pytest benchmarks/bench_model.py --benchmark-only``.
- GPU: 256, 512 and 1024 px; batch 1 and 8 (1024 px at batch 1); fp32 and bf16; every available
  backend and ``auto``, plus ``torch.compile`` of the reference and ``moce_kernels.optimize`` (256 and
  512 px) and, at batch 1, a CUDA graph replay of the fastest backend. Each case records the median
  time of ``triton.testing.do_bench`` and megapixels/s in ``extra_info``.
- CPU: MoCE-IR-S at 64 px, batch 1, fp32: the reference eager path (on a CPU every op runs its
  reference), ``torch.compile`` of the reference (``_baselines.compile_reference``: the authors' math
  visible to Inductor) and ``optimize()`` (Inductor around our opaque ops), side by side. With
  ``MOCE_AUTHORS_CODE=/path/moce_ir.py`` (the authors' file, kept outside this repository) also their
  model with the same weights.
- Both: ``test_op_census`` prints the ops and the analytic bytes of a forward per op family, the fused
  path beside the eager ops it replaces and the fused floor (``moce_kernels.census``).
Eval mode, no gradients, deterministic routing (their eval noise switched off for the comparison).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from typing import Callable, List, Tuple

import pytest
import torch

import moce_kernels
from moce_kernels import MoCEIR, census

sys.path.insert(0, os.path.dirname(__file__))
from _baselines import compile_reference, reference_decompositions  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def _cases() -> List[Tuple[str, int, int, torch.dtype]]:
    if not GPU:
        return [("MoCE_IR_S", 64, 1, torch.float32)]
    out = []
    for preset in ("MoCE_IR_S", "MoCE_IR"):
        for dtype in (torch.bfloat16, torch.float32):
            for px, batches in ((256, (1, 8)), (512, (1, 8)), (1024, (1,))):
                out += [(preset, px, b, dtype) for b in batches]
    return out


def _backends() -> List[str]:
    names = moce_kernels.available_backends()
    return names + ["auto"] if GPU else ["reference"]


_MODELS = {}


def _model(preset: str, dtype: torch.dtype) -> MoCEIR:
    key = (preset, dtype)
    if key not in _MODELS:
        _MODELS.clear()
        torch.manual_seed(0)
        _MODELS[key] = MoCEIR.from_preset(preset).eval().to(DEVICE, dtype)
    return _MODELS[key]


def _median_ms(fn: Callable[[], object]) -> float:
    if GPU:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    fn()
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[1] * 1e3


def _record(benchmark, fn, px: int, batch: int, **info) -> None:
    ms = _median_ms(fn)
    benchmark.extra_info.update(ms=ms, megapixels_per_s=batch * px * px / (ms * 1e-3) / 1e6, **info)
    benchmark.pedantic(fn, rounds=3 if GPU else 1, iterations=1, warmup_rounds=0)


def _sync(fn):
    def run():
        with torch.no_grad():
            out = fn()
        if GPU:
            torch.cuda.synchronize()
        return out
    return run


CASES = _cases()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("preset,px,batch,dtype", CASES,
                         ids=[f"{p}-{px}px-b{b}-{str(d).split('.')[-1]}" for p, px, b, d in CASES])
def test_model_forward(benchmark, backend, preset, px, batch, dtype):
    model = _model(preset, dtype)
    x = torch.rand(batch, 3, px, px, device=DEVICE, dtype=dtype)
    with moce_kernels.backend(backend):
        _record(benchmark, _sync(lambda: model(x)), px, batch, backend=backend, preset=preset, dtype=str(dtype))


# (preset, px, dtype) of the compiled variants: each compiles the whole model once per shape
COMPILED = ([(p, px, torch.bfloat16) for p in ("MoCE_IR_S", "MoCE_IR") for px in (256, 512)] if GPU
            else [("MoCE_IR_S", 64, torch.float32)])


@pytest.mark.parametrize("variant", ["compile(reference)", "optimize"])
@pytest.mark.parametrize("preset,px,dtype", COMPILED,
                         ids=[f"{p}-{px}px-{str(d).split('.')[-1]}" for p, px, d in COMPILED])
def test_model_forward_compiled(benchmark, variant, preset, px, dtype):
    """``torch.compile`` of the reference (the baseline) and ``moce_kernels.optimize`` (the fast path)."""
    model = _model(preset, dtype)
    x = torch.rand(1, 3, px, px, device=DEVICE, dtype=dtype)
    backend = "reference" if variant == "compile(reference)" else "auto"
    with moce_kernels.backend(backend), torch.no_grad():
        fn = compile_reference(model) if variant == "compile(reference)" else moce_kernels.optimize(model)
        t0 = time.perf_counter()
        fn(x)  # compilation (and on a GPU the CUDA-graph capture)
        first_s = time.perf_counter() - t0
        _record(benchmark, _sync(lambda: fn(x)), px, 1, backend=variant, preset=preset, dtype=str(dtype),
                first_call_s=first_s)


def test_op_census(benchmark):
    """Ops and analytic bytes of one MoCE-IR forward per op family: the fused path, the eager ops it
    replaces (our ops expanded into their references) and the fused floor. Counts, not timings."""
    model = _model("MoCE_IR", torch.float32 if not GPU else torch.bfloat16)
    x = torch.rand(1, 3, 256, 256, device=DEVICE, dtype=next(model.parameters()).dtype)
    fused = census.census(model, x)
    eager = census.census(model, x, expand=reference_decompositions())
    rows = ["| family | eager ops | fused ops | eager MB | fused MB | floor MB |", "|---|---:|---:|---:|---:|---:|"]
    for fam in sorted(eager.families, key=lambda f: -eager.families[f].bytes):
        e, f = eager.families[fam], fused.families.get(fam, census.FamilyStats())
        rows.append(f"| {fam} | {e.ops} | {f.ops} | {e.bytes / 1e6:.1f} | {f.bytes / 1e6:.1f} | {e.floor / 1e6:.1f} |")
    rows.append(f"| all | {eager.total_ops} | {fused.total_ops} | {eager.total_bytes / 1e6:.1f} | "
                f"{fused.total_bytes / 1e6:.1f} | {eager.total_floor / 1e6:.1f} |")
    print("\nMoCE-IR, 256 px, batch 1, one forward:\n" + "\n".join(rows))
    benchmark.extra_info.update(eager_ops=eager.total_ops, fused_ops=fused.total_ops, eager_bytes=eager.total_bytes,
                                fused_bytes=fused.total_bytes, floor_bytes=eager.total_floor)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("px", [256, 512])
def test_model_forward_cuda_graph(benchmark, px):
    name = [b for b in ("cuda", "triton") if b in moce_kernels.available_backends()][0]
    model = _model("MoCE_IR_S", torch.bfloat16)
    x = torch.rand(1, 3, px, px, device=DEVICE, dtype=torch.bfloat16)
    with moce_kernels.backend(name), torch.no_grad():
        for _ in range(2):
            model(x)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
    torch.cuda.synchronize()
    _record(benchmark, _sync(graph.replay), px, 1, backend=f"{name}+cudagraph", preset="MoCE_IR_S", dtype="bf16")
    assert torch.isfinite(out).all()


def _authors_module():
    path = os.environ.get("MOCE_AUTHORS_CODE")
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("moce_ir_official", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not os.environ.get("MOCE_AUTHORS_CODE"), reason="set MOCE_AUTHORS_CODE to the authors' file")
@pytest.mark.parametrize("px", [64, 256])
@pytest.mark.parametrize("impl", ["authors", "moce_kernels"])
def test_cpu_vs_authors(benchmark, impl, px):
    """MoCE-IR-S, batch 1, fp32, CPU, same weights: the authors' eager code against ours (reference)."""
    ours = MoCEIR.from_preset("MoCE_IR_S").eval()
    x = torch.rand(1, 3, px, px)
    if impl == "authors":
        from moce_kernels.model.presets import preset_config
        cfg = {k: v for k, v in preset_config("MoCE_IR_S").items()}
        theirs = _authors_module().MoCEIR(**cfg).eval()
        theirs.load_state_dict(ours.state_dict())
        for m in theirs.modules():
            if hasattr(m, "noise_std"):
                m.noise_std = 0.0  # deterministic routing, as ours in eval
        model = theirs
    else:
        model = ours
    with moce_kernels.backend("reference"):
        _record(benchmark, _sync(lambda: model(x)), px, 1, impl=impl)
