"""Roofline helpers for the expert_conv benchmarks: measured copy bandwidth and matmul rate (once per
session), and the bytes / FLOPs the fused pw->dw convolutions and the expert stage must move / do."""
from __future__ import annotations

import functools
from typing import Callable, Dict, Sequence

import torch

from _roofline import copy_bandwidth  # noqa: F401  (shared ceiling)


@functools.lru_cache(maxsize=None)
def matmul_rate(dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> float:
    """FLOP/s of a large square matmul in ``dtype`` (cuBLAS), median of do_bench."""
    import triton.testing

    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    return 2.0 * n ** 3 / (ms * 1e-3)


def es(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def pwdw_bytes(B: int, c_in: int, c_out: int, HW: int, k: int, dtype: torch.dtype, gated: bool,
               backward: bool = False) -> int:
    """Compulsory traffic of the fused op: forward reads x, writes the output (C_out or C_out/2 channels);
    backward reads x and the output grad, writes grad_x (weights and their grads are negligible)."""
    n_out = c_out // 2 if gated else c_out
    px = B * HW * es(dtype)
    w = (c_out * c_in + c_out * k * k + 2 * c_out) * es(dtype)
    return (px * (2 * c_in + n_out) if backward else px * (c_in + n_out)) + w


def pwdw_eager_bytes(B: int, c_in: int, c_out: int, HW: int, dtype: torch.dtype, gated: bool) -> int:
    """What the eager cuDNN pair moves in the forward: x -> y (C_out) -> dw (C_out) [-> gate (C_out/2)]."""
    px = B * HW * es(dtype)
    return px * (c_in + 3 * c_out + (c_out + c_out // 2 if gated else 0))


def pwdw_flops(B: int, c_in: int, c_out: int, HW: int, k: int, backward: bool = False) -> int:
    """Forward: 1x1 (2 C_in C_out) + depthwise (2 k^2 C_out) per pixel; backward about twice that
    plus the recomputed forward."""
    f = 2 * B * HW * (c_in * c_out + k * k * c_out)
    return 3 * f if backward else f


def experts_bytes(N: int, C: int, ranks_used: Sequence[int], HW: int, dtype: torch.dtype,
                  backward: bool = False) -> Dict[str, int]:
    """Expert stage over N = B*k rows. ``compulsory``: read x and shared rows, write the output rows
    (3 N C); ``design``: plus what the stage boundary at the window attention costs (q, k, v written
    and read, attn written and read: 8 r per row). ``backward``: forward + backward together: the forward's
    3 N C plus reading x, shared and the grad and writing grad_x and grad_shared (5 N C)."""
    e = es(dtype) * HW
    r_rows = sum(ranks_used)  # sum over rows of the row's expert rank
    comp = (8 if backward else 3) * N * C * e
    design = comp + (8 if not backward else 24) * r_rows * e
    return {"compulsory": comp, "design": design}


def roofline_info(ms: float, nbytes: int, flops: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """extra_info entries: bytes, roofline time (bytes / copy bandwidth, and FLOPs / matmul rate), achieved
    fraction of the memory roofline."""
    bw = copy_bandwidth()
    roof_ms = nbytes / bw * 1e3
    info = {"ms": ms, "bytes": nbytes, "copy_GBps": bw / 1e9, "roofline_ms": roof_ms,
            "roofline_fraction": roof_ms / ms if ms > 0 else float("nan"),
            "achieved_GBps": nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")}
    if flops:
        rate = matmul_rate(torch.bfloat16 if dtype != torch.float32 else torch.float32)
        info.update({"flops": flops, "matmul_TFLOPs": rate / 1e12, "compute_roofline_ms": flops / rate * 1e3})
    return info


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
