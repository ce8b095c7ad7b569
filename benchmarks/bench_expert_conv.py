"""Benchmarks of the expert_conv family: fused pointwise -> depthwise convolutions and the grouped,
sync-free MoCE expert stage, every backend, with rooflines.

Run: ``pytest benchmarks/bench_expert_conv.py --benchmark-only``. On a GPU each case is timed with
``triton.testing.do_bench`` (median); ``benchmark.extra_info`` records the roofline (compulsory bytes /
measured copy bandwidth; FLOPs / measured cuBLAS rate), the achieved fraction, and the speedup over the
anchor (the eager cuDNN pair for the convs, the per-expert loop for the expert stage) measured in the same
session. pytest-benchmark's own timing wraps a synchronising call. Without a GPU, two tiny reference
cases keep the suite fast.

Cases (MoCE-IR, dim 48; level 1: C = 96 at px/2; bf16 and fp32):
  * ``test_pwdw``: the trunk's pw->dw convs (MDTA qkv C->3C dw3, cross-attention q C->C dw3 and kv C->2C
    dw7, GDFN C->4C dw3 gated to 2C) and the experts' (q: r->r dw3, kv: r->2r dw7, r in C/8..C), at
    px in {256, 512}, batch 1 and 8, forward; backward (``test_pwdw_backward``) at batch 8.
    ``test_pwdw_widths``: qkv and kv at batch 8, 128 rows of W = 128, 124, 122, 123 pixels (the CUDA
    16-bit forward stages x by 16-, 8-, 4-byte cp.async or element-wise: the lower levels of images
    padded to a multiple of 8 take the narrower ways).
    Backends: reference (= the eager pair of cuDNN convolutions), triton, cuda, compile (torch.compile
    of the reference). Targets: >= 2x eager and >= 70% of the memory roofline (bf16).
  * ``test_experts``: the whole expert stage (moe_experts) at each decoder level (C, H) = (192, px/4),
    (96, px/2), (48, px), batch 8, mixed routing (top-1: image b -> expert b % 4; top-2: b % 4 and
    (b + 1) % 4), forward and forward+backward. Backends: reference (the per-expert loop), triton, cuda,
    compile. Target: >= 3x the per-expert loop at batch 8.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import _roofline_expert_conv as roof  # noqa: E402

import moce_kernels  # noqa: E402
from moce_kernels import ops  # noqa: E402
from moce_kernels.reference import expert_conv as ref_conv  # noqa: E402
from moce_kernels.expert_stage.weights import ExpertWeights, flatten  # noqa: E402
from moce_kernels.reference import expert_stage as ref_experts  # noqa: E402
from moce_kernels.reference import routing as ref_routing  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
AVAILABLE = moce_kernels.available_backends()
BACKENDS = ([b for b in ("reference", "triton", "cuda") if b in AVAILABLE] + ["compile"]) if GPU else ["reference"]
DTYPES = [torch.bfloat16, torch.float32] if GPU else [torch.float32]
CONV_DTYPES = [torch.bfloat16] if GPU else [torch.float32]


def _skip_compile(backend: str, dtype: torch.dtype, B: int = 8) -> None:
    """torch.compile recompiles per shape: keep it to the bf16, batch-8 cases so the suite stays short."""
    if GPU and backend == "compile" and (dtype != torch.bfloat16 or B != 8):
        pytest.skip("compile only at bf16, batch 8")

# (name, C_in, C_out, k, gated, pw_bias, dw_bias) at level 1 (C = 96)
C1 = 96
CONVS = [("qkv", C1, 3 * C1, 3, False, False, False), ("xq", C1, C1, 3, False, False, False),
         ("xkv", C1, 2 * C1, 7, False, False, False), ("gdfn", C1, 4 * C1, 3, True, False, False)]
CONVS += [(f"exp_q_r{r}", r, r, 3, False, False, True) for r in (C1 // 8, C1 // 4, C1 // 2, C1)]
CONVS += [(f"exp_kv_r{r}", r, 2 * r, 7, False, False, True) for r in (C1 // 8, C1 // 4, C1 // 2, C1)]
SIZES = [(B, px // 2) for px in (256, 512) for B in (1, 8)] if GPU else [(1, 8)]
if not GPU:
    CONVS = [CONVS[0], CONVS[3]]


def _conv_inputs(conv, B: int, H: int, dtype: torch.dtype, grad: bool = False, W: Optional[int] = None):
    _, ci, co, k, gated, hpb, hdb = conv
    g = functools.partial(torch.randn, device=DEVICE, dtype=dtype)
    args = [g(B, ci, H, H if W is None else W), g(co, ci, 1, 1) * ci ** -0.5, g(co, 1, k, k) / k,
            g(co) if hpb else None, g(co) if hdb else None]
    if grad:
        args = [None if a is None else a.requires_grad_(True) for a in args]
    return args


def _conv_fn(backend: str, gated: bool) -> Callable:
    if backend == "compile":
        return torch.compile(ref_conv.pointwise_depthwise_conv_gated if gated else ref_conv.pointwise_depthwise_conv)
    op = ops.pointwise_depthwise_conv_gated if gated else ops.pointwise_depthwise_conv

    def run(*args):
        with moce_kernels.backend(backend):
            return op(*args)
    return run


def _record(benchmark, fn: Callable[[], object], nbytes: int, flops: int, dtype: torch.dtype,
            anchor_ms: Optional[float], **extra) -> None:
    if GPU:
        ms = roof.bench_ms(fn)
        info = roof.roofline_info(ms, nbytes, flops, dtype)
        if anchor_ms is not None:
            info["speedup_vs_anchor"] = anchor_ms / ms
            info["anchor_ms"] = anchor_ms
        info.update(extra)
        benchmark.extra_info.update(info)

        def sync():
            fn()
            torch.cuda.synchronize()
        benchmark.pedantic(sync, rounds=10, warmup_rounds=2)
    else:
        benchmark.extra_info.update(extra)
        benchmark.pedantic(fn, rounds=2, warmup_rounds=0)


_ANCHOR: Dict[Tuple, float] = {}


def _anchor(key: Tuple, fn: Callable[[], object]) -> Optional[float]:
    if not GPU:
        return None
    if key not in _ANCHOR:
        _ANCHOR[key] = roof.bench_ms(fn)
    return _ANCHOR[key]


# ----------------------------------------------------------------------------- fused pw -> dw
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B{s[0]}_{s[1]}x{s[1]}")
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: c[0])
def test_pwdw(benchmark, conv, size, dtype, backend):
    B, H = size
    _skip_compile(backend, dtype, B)
    name, ci, co, k, gated = conv[:5]
    args = _conv_inputs(conv, B, H, dtype)
    fn = _conv_fn(backend, gated)
    anchor_fn = _conv_fn("reference", gated)
    anchor = _anchor(("pwdw", name, size, dtype), lambda: anchor_fn(*args))
    _record(benchmark, lambda: fn(*args), roof.pwdw_bytes(B, ci, co, H * H, k, dtype, gated),
            roof.pwdw_flops(B, ci, co, H * H, k), dtype, anchor, backend=backend, case=name,
            eager_bytes=roof.pwdw_eager_bytes(B, ci, co, H * H, dtype, gated))


WIDTHS = [128, 124, 122, 123] if GPU else [8, 6]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("W", WIDTHS)
@pytest.mark.parametrize("conv", [CONVS[0], CONVS[2]] if GPU else CONVS[:1], ids=lambda c: c[0])
def test_pwdw_widths(benchmark, conv, W, dtype, backend):
    B, H = (8, 128) if GPU else (1, 8)
    if backend == "compile" and W != WIDTHS[0]:
        pytest.skip("compile at the first width only")
    name, ci, co, k, gated = conv[:5]
    args = _conv_inputs(conv, B, H, dtype, W=W)
    fn = _conv_fn(backend, gated)
    anchor_fn = _conv_fn("reference", gated)
    anchor = _anchor(("pwdw_w", name, W, dtype), lambda: anchor_fn(*args))
    _record(benchmark, lambda: fn(*args), roof.pwdw_bytes(B, ci, co, H * W, k, dtype, gated),
            roof.pwdw_flops(B, ci, co, H * W, k), dtype, anchor, backend=backend, case=f"{name}_w{W}",
            eager_bytes=roof.pwdw_eager_bytes(B, ci, co, H * W, dtype, gated))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("conv", CONVS, ids=lambda c: c[0])
def test_pwdw_backward(benchmark, conv, dtype, backend):
    B, H = (8, 128) if GPU else (1, 8)
    name, ci, co, k, gated = conv[:5]
    args = _conv_inputs(conv, B, H, dtype, grad=True)
    grad = torch.randn(B, co // 2 if gated else co, H, H, device=DEVICE, dtype=dtype)
    leaves = [a for a in args if a is not None]

    def make(be):
        f = _conv_fn(be, gated)
        out = f(*args)
        return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)
    anchor = _anchor(("pwdw_bwd", name, dtype), make("reference"))
    _record(benchmark, make(backend), roof.pwdw_bytes(B, ci, co, H * H, k, dtype, gated, backward=True),
            roof.pwdw_flops(B, ci, co, H * H, k, backward=True), dtype, anchor, backend=backend, case=name)


# ----------------------------------------------------------------------------- expert stage
E = 4
LEVELS = [(C, px // s) for px in (256, 512) for C, s in ((192, 4), (96, 2), (48, 1))] if GPU else [(8, 8)]


def _expert_setup(C: int, H: int, dtype: torch.dtype, top_k: int, B: int, grad: bool = False):
    ranks = [max(1, C // 8), max(1, C // 4), max(1, C // 2), C]
    g = functools.partial(torch.randn, device=DEVICE, dtype=dtype)
    ws = []
    for r in ranks:
        ws.append(ExpertWeights(
            proj0=g(r, C, 1, 1) * C ** -0.5, proj1=g(r, C, 1, 1) * C ** -0.5, proj2=g(C, r, 1, 1) * r ** -0.5,
            q=g(r, r, 1, 1) * r ** -0.5, q_dw=g(r, 1, 3, 3) / 3, q_dw_bias=g(r), kv=g(2 * r, r, 1, 1) * r ** -0.5,
            kv_dw=g(2 * r, 1, 7, 7) / 7, kv_dw_bias=g(2 * r), norm_weight=1 + 0.1 * g(r), norm_bias=0.1 * g(r),
            proj_out=g(r, r, 1, 1) * r ** -0.5, proj_out_bias=g(r)))
    x, sh = g(B, C, H, H), g(B, C, H, H)
    idx = torch.tensor([[(b + j) % E for j in range(top_k)] for b in range(B)], device=DEVICE)
    _, offsets, perm = ref_routing.dispatch(idx, E)
    if grad:
        ws = [w.map(lambda t: t.requires_grad_(True)) for w in ws]
        x.requires_grad_(True)
        sh.requires_grad_(True)
    rows_rank = [ranks[int(idx.view(-1)[s])] for s in range(B * top_k)]
    return (x, sh, perm, offsets, top_k, ws, [4, 8, 16, 32], [1, 1, 1, 1]), rows_rank


def _experts_fn(backend: str) -> Callable:
    if backend == "compile":
        return torch.compile(ref_experts.experts)

    def run(*args):
        with moce_kernels.backend(backend):
            return ops.moe_experts(*args)
    return run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: f"C{lv[0]}_{lv[1]}x{lv[1]}")
def test_experts(benchmark, level, top_k, dtype, backend):
    C, H = level
    B = 8 if GPU else 2
    _skip_compile(backend, dtype)
    args, rows_rank = _expert_setup(C, H, dtype, top_k, B)
    fn = _experts_fn(backend)
    ref_fn = _experts_fn("reference")
    anchor = _anchor(("experts", level, top_k, dtype), lambda: ref_fn(*args))
    nb = roof.experts_bytes(B * top_k, C, rows_rank, H * H, dtype)
    _record(benchmark, lambda: fn(*args), nb["compulsory"], 0, dtype, anchor, backend=backend,
            design_bytes=nb["design"], N=B * top_k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: f"C{lv[0]}_{lv[1]}x{lv[1]}")
def test_experts_forward_backward(benchmark, level, dtype, backend):
    C, H = level
    B, top_k = (8, 1) if GPU else (2, 1)
    _skip_compile(backend, dtype)
    args, rows_rank = _expert_setup(C, H, dtype, top_k, B, grad=True)
    leaves = [args[0], args[1]] + flatten(args[5])

    def make(be):
        f = _experts_fn(be)

        def run():
            out = f(*args)
            return torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
        return run
    anchor = _anchor(("experts_fb", level, dtype), make("reference"))
    nb = roof.experts_bytes(B * top_k, C, rows_rank, H * H, dtype, backward=True)
    _record(benchmark, make(backend), nb["compulsory"], 0, dtype, anchor, backend=backend, design_bytes=nb["design"])
