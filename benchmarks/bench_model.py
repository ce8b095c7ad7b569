"""Whole-model speed: MoCE-IR and MoCE-IR-S per backend, reporting megapixels/s.

Run: ``pytest benchmarks/bench_model.py --benchmark-only``.
- GPU: 256, 512 and 1024 px; batch 1 and 8 (1024 px at batch 1); fp32 and bf16; every available
  backend, plus ``torch.compile`` of the reference (MoCE-IR-S, 256 px) and, at batch 1, a CUDA
  graph replay of the fastest backend. Each case records the median time of
  ``triton.testing.do_bench`` and megapixels/s in ``extra_info``.
- CPU: MoCE-IR-S at 64 px, batch 1, reference backend; with ``MOCE_AUTHORS_CODE=/path/moce_ir.py``
  (the authors' file, kept outside this repository) also their model with the same weights, so the
  two are timed side by side in one run.
Eval mode, no gradients, deterministic routing (their eval noise switched off for the comparison).
"""
from __future__ import annotations

import importlib.util
import os
import time
from typing import Callable, List, Tuple

import pytest
import torch

import moce_kernels
from moce_kernels import MoCEIR

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


@pytest.mark.skipif(not GPU, reason="torch.compile timing is a GPU benchmark")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_forward_compiled_reference(benchmark, dtype):
    model = _model("MoCE_IR_S", dtype)
    x = torch.rand(1, 3, 256, 256, device=DEVICE, dtype=dtype)
    with moce_kernels.backend("reference"):
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(x)
        _record(benchmark, _sync(lambda: compiled(x)), 256, 1, backend="compile(reference)", preset="MoCE_IR_S",
                dtype=str(dtype))


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
