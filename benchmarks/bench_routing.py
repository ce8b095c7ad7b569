"""Routing benchmarks: the MoCE layer and its router / dispatch / combine, every backend.

Run: ``pytest benchmarks/bench_routing.py --benchmark-only``. On a GPU each case times with
``triton.testing.do_bench`` (median) and records in ``benchmark.extra_info`` the roofline (bytes that
must move / measured copy bandwidth) and the achieved fraction; pytest-benchmark's own timing wraps a
synchronising call. Without a GPU, one tiny reference case keeps the suite fast.

Cases (MoCE-IR preset: dim 48, top-1, E = 4, ranks C/8..C, windows 4..32, freq_dim 384):
  * ``test_layer``: one MoCE layer forward (eval) at each decoder level (C, H) = (192, px/4),
    (96, px/2), (48, px) for px in {256, 512}, batch 1 and 8: backends reference (the authors-style
    per-expert loop, host-synchronising), triton, cuda, ``compile`` (torch.compile of the layer on the
    reference), and ``forced`` (every expert on every image: top-k with k = E, fastest backend).
    Image b goes to expert b % 4 (batch 1: the cheapest expert, the worst case for the overhead).
  * ``test_routing_overhead``: route + dispatch + combine time as a fraction of the expert stage
    (target < 5% on H200), fast backends, top-1 and top-2.
  * ``test_op``: each routing op alone (forward and backward) with its roofline.
  * ``test_model_cuda_graph``: the whole MoCE-IR forward at batch 1 (256 px) captured in a CUDA graph,
    against eager (same backend) and the reference backend.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Tuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _roofline_routing as roof  # noqa: E402

import moce_kernels  # noqa: E402
from moce_kernels import ops  # noqa: E402
from moce_kernels.backends import resolve  # noqa: E402
from moce_kernels.model.moe import AdapterLayer  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
E, FREQ_DIM = 4, 384
FAST = [b for b in moce_kernels.available_backends() if b != "reference"] if GPU else []
DTYPES = [torch.float32, torch.bfloat16] if GPU else [torch.float32]
Case = Tuple[int, int, int]  # (B, C, H)


def _cases() -> List[Case]:
    if not GPU:
        return [(2, 8, 16)]
    return [(B, C, px // s) for px in (256, 512) for B in (1, 8) for C, s in ((192, 4), (96, 2), (48, 1))]


CASES = _cases()


def _id(case: Case) -> str:
    B, C, H = case
    return f"B{B}_C{C}_{H}x{H}"


def _has_impl(op: str, backend: str) -> bool:
    try:
        moce_kernels.backends.implementation(op, backend)
        return True
    except NotImplementedError:
        return False


# ----------------------------------------------------------------------------- inputs
def _layer(C: int, dtype: torch.dtype, top_k: int = 1) -> AdapterLayer:
    """Preset-style MoCE layer (rank_type spread, depth 1) whose router sends image b to expert b % E
    through freq_emb (see :func:`_inputs`)."""
    torch.manual_seed(0)
    layer = AdapterLayer(C, 2, num_experts=E, top_k=top_k, stage_depth=1, depth_type="constant",
                         rank_type="spread", freq_dim=FREQ_DIM, with_complexity=True, complexity_scale="max")
    with torch.no_grad():
        layer.routing.gate[2].weight.zero_()
        fw = torch.zeros(E, FREQ_DIM)
        fw[:, :E] = 10.0 * torch.eye(E)
        layer.routing.freq_gate.weight.copy_(fw)
    return layer.eval().to(device=DEVICE, dtype=dtype)


def _inputs(case: Case, dtype: torch.dtype):
    B, C, H = case
    x = torch.randn(B, C, H, H, device=DEVICE, dtype=dtype)
    shared = torch.randn(B, C, H, H, device=DEVICE, dtype=dtype)
    fe = torch.zeros(B, FREQ_DIM, device=DEVICE, dtype=dtype)
    for b in range(B):
        fe[b, b % E] = 1.0
        fe[b, (b + 1) % E] = 0.5  # a distinct second choice for top-2
    return x, fe, shared


def _with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with moce_kernels.backend(backend):
            return fn()
    return run


def _time(benchmark, fn: Callable[[], object], info: Dict) -> float:
    """Run fn once (JIT / autotune), time it (GPU: do_bench median), record info; returns ms."""
    benchmark.extra_info.update(info)
    fn()
    if GPU:
        torch.cuda.synchronize()
        ms = roof.bench_ms(fn)
        benchmark.extra_info["ms"] = ms

        def sync_fn():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(sync_fn, rounds=5, iterations=1, warmup_rounds=1)
        return ms
    benchmark.pedantic(fn, rounds=2, iterations=1)
    return float("nan")


# ----------------------------------------------------------------------------- the layer
LAYER_VARIANTS = ["reference", "compile", "forced"] + FAST


def _forced(layer: AdapterLayer, x, fe, shared):
    """Every expert on every image: top-k with k = E through the same ops."""
    r = layer.routing
    gates, idx, _, _ = ops.moe_route(x, fe, r.gate[2].weight, r.freq_gate.weight, r.complexity,
                                     layer._noise(x), E, r.noise_std, False, r.use_complexity_bias)
    _, offsets, perm = ops.moe_dispatch(idx, E)
    mods = layer.expert_modules()
    rows = ops.moe_experts(x, shared, perm, offsets, E, layer.expert_weights(), [m.patch_size for m in mods],
                           [m.depth for m in mods])
    return layer.proj_out(ops.moe_combine(rows, gates, perm))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("variant", LAYER_VARIANTS)
def test_layer(benchmark, variant, case, dtype):
    if not GPU and variant != "reference":
        pytest.skip("CPU: one tiny reference case")
    if GPU and dtype == torch.float32 and case[0] == 1:
        pytest.skip("fp32 measured at batch 8 only")
    layer = _layer(case[1], dtype)
    x, fe, shared = _inputs(case, dtype)
    if variant == "compile":
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        compiled = torch.compile(layer, dynamic=False)
        fn = _with_backend("reference", lambda: compiled(x, fe, shared))
    elif variant == "forced":
        be = resolve("moe_experts", DEVICE, "auto")
        fn = _with_backend("auto", lambda: _forced(layer, x, fe, shared))
        benchmark.extra_info["experts_backend"] = be
    else:
        if not _has_impl("moe_experts", variant):
            pytest.skip(f"no {variant} moe_experts yet")
        fn = _with_backend(variant, lambda: layer(x, fe, shared))
    with torch.no_grad():
        _time(benchmark, fn, {"variant": variant, "case": _id(case), "dtype": str(dtype), "top_k": 1})


# ----------------------------------------------------------------------------- overhead fraction
@pytest.mark.skipif(not GPU, reason="GPU timing")
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("backend", FAST)
def test_routing_overhead(benchmark, backend, case, dtype, top_k):
    """(route + dispatch + combine) / expert stage, each timed alone (do_bench medians)."""
    if dtype == torch.float32 and case[0] == 1:
        pytest.skip("fp32 measured at batch 8 only")
    layer = _layer(case[1], dtype, top_k)
    x, fe, shared = _inputs(case, dtype)
    r = layer.routing
    noise = layer._noise(x)
    mods = layer.expert_modules()
    weights, windows, depths = layer.expert_weights(), [m.patch_size for m in mods], [m.depth for m in mods]
    with torch.no_grad(), moce_kernels.backend(backend):
        gates, idx, _, _ = ops.moe_route(x, fe, r.gate[2].weight, r.freq_gate.weight, r.complexity, noise, top_k,
                                         r.noise_std, False, True)
        _, offsets, perm = ops.moe_dispatch(idx, E)
        exp_backend = backend if _has_impl("moe_experts", backend) else "reference"
        with moce_kernels.backend(exp_backend):
            rows = ops.moe_experts(x, shared, perm, offsets, top_k, weights, windows, depths)
        t = {
            "route": roof.bench_ms(lambda: ops.moe_route(x, fe, r.gate[2].weight, r.freq_gate.weight, r.complexity,
                                                         noise, top_k, r.noise_std, False, True)),
            "dispatch": roof.bench_ms(lambda: ops.moe_dispatch(idx, E)),
            "combine": roof.bench_ms(lambda: ops.moe_combine(rows, gates, perm)),
            "proj_out": roof.bench_ms(lambda: layer.proj_out(rows[:x.shape[0]])),
        }
        with moce_kernels.backend(exp_backend):
            t["experts"] = roof.bench_ms(lambda: ops.moe_experts(x, shared, perm, offsets, top_k, weights, windows,
                                                                 depths))
        overhead = t["route"] + t["dispatch"] + t["combine"]
        info = {f"{n}_ms": v for n, v in t.items()}
        info.update({"backend": backend, "experts_backend": exp_backend, "case": _id(case), "dtype": str(dtype),
                     "top_k": top_k, "overhead_ms": overhead, "overhead_fraction": overhead / t["experts"],
                     "target_fraction": 0.05,
                     "route_roofline_ms": roof.route_bytes(x.shape, dtype) / roof.copy_bandwidth() * 1e3,
                     "combine_roofline_ms": roof.combine_bytes(x.shape, top_k, dtype) / roof.copy_bandwidth() * 1e3})
        benchmark.extra_info.update(info)

        def chain():
            g, i, _, _ = ops.moe_route(x, fe, r.gate[2].weight, r.freq_gate.weight, r.complexity, noise, top_k,
                                       r.noise_std, False, True)
            _, _, p = ops.moe_dispatch(i, E)
            ops.moe_combine(rows, g, p)
            torch.cuda.synchronize()
        benchmark.pedantic(chain, rounds=5, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------- single ops
OPS = ["route", "route_backward", "dispatch", "combine", "combine_backward"]
OP_BACKENDS = (["reference", "compile"] + FAST) if GPU else ["reference"]
_COMPILED: Dict[str, Callable] = {}


def _op_fn(op: str, backend: str, case: Case, dtype: torch.dtype, k: int):
    """(callable, bytes that must move) for one routing op on MoCE-layer-sized inputs."""
    from moce_kernels.reference import routing as ref

    B, C, H = case
    x, fe, _ = _inputs(case, dtype)
    gw = torch.randn(E, C, device=DEVICE, dtype=dtype) / C ** 0.5
    fw = torch.randn(E, FREQ_DIM, device=DEVICE, dtype=dtype) / FREQ_DIM ** 0.5
    cplx = torch.rand(E, device=DEVICE)
    noise = torch.randn(B, E, device=DEVICE) / E
    idx = torch.stack([torch.randperm(E, device=DEVICE)[:k] for _ in range(B)])
    perm = ref.dispatch(idx, E)[2]
    rows = torch.randn((B * k,) + tuple(x.shape[1:]), device=DEVICE, dtype=dtype)
    gates = torch.rand(B, k, device=DEVICE)
    grad = torch.randn_like(x)
    gg, gl, gL = torch.randn(B, k, device=DEVICE), torch.randn(B, E, device=DEVICE), torch.ones((), device=DEVICE)
    route_args = (x, fe, gw, fw, cplx, noise, k, 0.25, True, True)
    args = {"route": route_args, "route_backward": (gg, gl, gL) + route_args, "dispatch": (idx, E),
            "combine": (rows, gates, perm), "combine_backward": (grad, rows, gates, perm)}[op]
    nbytes = {"route": roof.route_bytes(x.shape, dtype), "route_backward": roof.route_bytes(x.shape, dtype, True),
              "dispatch": 0, "combine": roof.combine_bytes(x.shape, k, dtype),
              "combine_backward": roof.combine_bytes(x.shape, k, dtype, True)}[op]
    impl_name = "moe_" + op
    if backend == "compile":
        key = impl_name
        if key not in _COMPILED:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
            _COMPILED[key] = torch.compile(moce_kernels.backends.implementation(impl_name, "reference"), dynamic=False)
        fn = _COMPILED[key]
    else:
        fn = moce_kernels.backends.implementation(impl_name, backend)
    return (lambda: fn(*args)), nbytes


OP_CASES = [(1, 48, 256), (8, 48, 256), (8, 48, 512), (8, 192, 128)] if GPU else CASES


def _skip_op(backend: str, op: str, case: Case, dtype: torch.dtype, k: int) -> str:
    """Reason to skip an op case ('' to run): keeps the GPU session short."""
    if not GPU:
        return "" if op in ("route", "combine") else "CPU: one tiny reference case per op family"
    if dtype == torch.float32 and (case[0] == 1 or op == "dispatch"):
        return "fp32 measured at batch 8 only (dispatch does not depend on the dtype)"
    if k == 2 and (not op.startswith("combine") or dtype == torch.float32):
        return "k = 2 only changes combine; measured in bf16"
    if backend == "compile" and op not in ("route", "combine"):
        return "torch.compile of the reference: forward route and combine only"
    return ""


@pytest.mark.parametrize("k", [1, 2] if GPU else [1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OP_CASES, ids=_id)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op(benchmark, backend, op, case, dtype, k):
    why = _skip_op(backend, op, case, dtype, k)
    if why:
        pytest.skip(why)
    fn, nbytes = _op_fn(op, backend, case, dtype, k)
    ms = _time(benchmark, fn, {"backend": backend, "op": op, "case": _id(case), "dtype": str(dtype), "k": k})
    if GPU and nbytes:
        benchmark.extra_info.update(roof.roofline_info(ms, nbytes))


# ----------------------------------------------------------------------------- whole model, CUDA graph
@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("preset", ["MoCE_IR", "MoCE_IR_S"])
def test_model_cuda_graph(benchmark, preset, dtype):
    """Batch 1, 256 px, eval: eager (auto and reference backends) vs the whole forward in one CUDA graph."""
    if resolve("moe_experts", DEVICE, "auto") == "reference":
        pytest.skip("auto resolves moe_experts to the reference (host-synchronising): no CUDA graph possible")
    model = moce_kernels.MoCEIR.from_preset(preset).eval().to(device=DEVICE, dtype=dtype)
    x = torch.rand(1, 3, 256, 256, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        eager_auto = roof.bench_ms(_with_backend("auto", lambda: model(x)))
        eager_ref = roof.bench_ms(_with_backend("reference", lambda: model(x)))
        with moce_kernels.backend("auto"):
            graph = roof.graph_ms(lambda: model(x))
            static_out = None

            # the pytest-benchmark timing: a captured graph replay + sync
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model(x)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                static_out = model(x)
            g.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(static_out.float(), model(x).float(), rtol=2e-2, atol=2e-2)
    benchmark.extra_info.update({"preset": preset, "dtype": str(dtype), "eager_auto_ms": eager_auto,
                                 "eager_reference_ms": eager_ref, "cuda_graph_ms": graph,
                                 "graph_speedup_vs_eager": eager_auto / graph,
                                 "graph_speedup_vs_reference": eager_ref / graph})

    def replay():
        g.replay()
        torch.cuda.synchronize()
    benchmark.pedantic(replay, rounds=10, iterations=1, warmup_rounds=2)
