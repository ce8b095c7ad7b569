"""Roofline helpers for the window FFT attention benchmarks: measured copy bandwidth (once per
session) and the bytes / FLOPs the op must move / do."""
from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

from _roofline import copy_bandwidth  # noqa: F401  (shared ceiling)


def min_bytes(shape: Tuple[int, int, int, int], dtype: torch.dtype, backward: bool = False) -> int:
    """Bytes that must move: forward reads q, k, v and writes out; backward reads grad, q, k, v and
    writes grad_q, grad_k, grad_v (the (C,) parameters are negligible)."""
    numel = math.prod(shape)
    return (7 if backward else 4) * numel * torch.tensor([], dtype=dtype).element_size()


def kernel_flops(shape: Tuple[int, int, int, int], p: int, backward: bool = False) -> int:
    """FLOPs of the Triton tensor-core scheme (2 per MAC), counted per pixel and channel:
    separable layout (p >= 8, tile T = max(p, 16)): a real T x T x T dot is T MACs per pixel; one
    convolution is 14 dots (z = q + ik trick), forward = 2 convolutions (statistics + output pass)
    = 28 T MACs, backward = 14 + 14 + 28 = 56 T MACs. Kronecker layout (p = 4): a dot is 16 MACs
    per pixel; forward 12 dots = 192 MACs, backward 24 dots = 384 MACs."""
    B, C, H, W = shape
    macs = (384 if backward else 192) if p == 4 else (56 if backward else 28) * max(p, 16)
    return 2 * macs * B * C * H * W


def roofline_info(ms: float, shape, dtype, p: int, backward: bool = False) -> dict:
    """extra_info entries: bytes, roofline time, achieved fraction of the copy bandwidth."""
    bw = copy_bandwidth()
    nbytes = min_bytes(shape, dtype, backward)
    roof_ms = nbytes / bw * 1e3
    return {"ms": ms, "bytes": nbytes, "copy_GBps": bw / 1e9, "roofline_ms": roof_ms,
            "roofline_fraction": roof_ms / ms, "achieved_GBps": nbytes / (ms * 1e-3) / 1e9,
            "kernel_TFLOPs": kernel_flops(shape, p, backward) / (ms * 1e-3) / 1e12}


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
