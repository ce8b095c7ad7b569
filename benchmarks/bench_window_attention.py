"""Window FFT attention benchmarks: every backend and torch.compile(reference) on MoCE-IR shapes.

Run: ``pytest benchmarks/bench_window_attention.py --benchmark-only``. On a GPU, each case times
the op with ``triton.testing.do_bench`` (median) and records the roofline (bytes that must move /
measured copy bandwidth) and the achieved fraction in ``benchmark.extra_info``; pytest-benchmark's
own timing wraps a synchronising call. Without a GPU, one tiny reference case keeps the suite fast.

Shapes: MoCE-IR at 256 and 512 px, batch 1 and 8; level-2 experts see (B, C/8..C, H, W) with C=48,
level-0 experts (B, C/8..C, H/4, W/4) with C=192; expert e has rank C/2^(3-e) and window 4*2^e.
"""
from __future__ import annotations

import os
import sys
from typing import List, Tuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _roofline_window_attention as roof  # noqa: E402

import moce_kernels  # noqa: E402
from moce_kernels.reference.window_attention import window_fft_attention as ref_fn  # noqa: E402

GPU = torch.cuda.is_available()
Case = Tuple[Tuple[int, int, int, int], int]


def _cases() -> List[Case]:
    if not GPU:
        return [((1, 6, 32, 32), 4)]
    cases = []
    for px in (256, 512):
        for B in (1, 8):
            for C, H in ((48, px), (192, px // 4)):
                for e, p in enumerate((4, 8, 16, 32)):
                    cases.append(((B, C >> (3 - e), H, H), p))
    return cases


CASES = _cases()
BACKENDS = [b for b in moce_kernels.available_backends() if GPU or b == "reference"] + (["compile"] if GPU else [])
DTYPES = [torch.bfloat16, torch.float32] if GPU else [torch.float32]


def _id(case: Case) -> str:
    (B, C, H, W), p = case
    return f"B{B}_C{C}_{H}x{W}_p{p}"


def _inputs(shape, dtype, device):
    C = shape[1]
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    w = torch.ones(C, device=device, dtype=dtype)
    b = torch.zeros(C, device=device, dtype=dtype)
    return q, k, v, w, b


_COMPILED = {}


def _compiled():
    """torch.compile of the reference (one static graph per shape; AOTAutograd compiles its backward)."""
    if "fn" not in _COMPILED:
        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit"):  # the name differs across torch versions
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 512))
        _COMPILED["fn"] = torch.compile(ref_fn, dynamic=False)
    return _COMPILED["fn"]


def _runner(backend: str, backward: bool, q, k, v, p, w, b):
    if backend == "compile":
        fn = _compiled()
        if backward:
            # forward + backward (the compiled graph saves what its backward needs; our kernels'
            # backward recomputes the forward, so this is the comparable quantity)
            ins = [t.detach().requires_grad_(True) for t in (q, k, v, w, b)]
            g = torch.randn_like(q)
            return lambda: torch.autograd.grad(fn(ins[0], ins[1], ins[2], p, ins[3], ins[4], 1e-5), ins, g)
        return lambda: fn(q, k, v, p, w, b, 1e-5)
    impl = moce_kernels.backends.implementation(
        "window_fft_attention_backward" if backward else "window_fft_attention", backend)
    if backward:
        g = torch.randn_like(q)
        return lambda: impl(g, q, k, v, p, w, b, 1e-5)
    return lambda: impl(q, k, v, p, w, b, 1e-5)


def _run(benchmark, backend, case, dtype, backward):
    shape, p = case
    device = "cuda" if GPU else "cpu"
    q, k, v, w, b = _inputs(shape, dtype, device)
    fn = _runner(backend, backward, q, k, v, p, w, b)
    benchmark.extra_info.update({"backend": backend, "shape": list(shape), "window": p, "dtype": str(dtype),
                                 "pass": "backward" if backward else "forward"})
    if GPU:
        fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        ms = roof.bench_ms(fn)
        benchmark.extra_info.update(roof.roofline_info(ms, shape, dtype, p, backward))

        def sync_fn():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(sync_fn, rounds=5, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(fn, rounds=2, iterations=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(benchmark, backend, case, dtype):
    if GPU and dtype == torch.float32 and case[0][0] == 1:
        pytest.skip("fp32 measured at batch 8 only")
    _run(benchmark, backend, case, dtype, backward=False)


@pytest.mark.parametrize("case", [c for c in CASES if c[0][0] != 1 or not GPU], ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward(benchmark, backend, case):
    _run(benchmark, backend, case, torch.bfloat16 if GPU else torch.float32, backward=True)
