"""Roofline helpers for the routing benchmarks: measured copy bandwidth (once per session) and the bytes
the routing ops must move."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from _roofline import copy_bandwidth  # noqa: F401  (shared ceiling)


def _es(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def route_bytes(shape: Sequence[int], dtype: torch.dtype, backward: bool = False) -> int:
    """Router: forward reads x once (B*C*H*W); backward reads x (to recompute the pooled means) and
    writes grad_x. The (B, E), (E, C), (B, F) tensors are negligible."""
    n = math.prod(shape) * _es(dtype)
    return 2 * n if backward else n


def combine_bytes(shape: Sequence[int], k: int, dtype: torch.dtype, backward: bool = False) -> int:
    """Combine over (B, C, H, W) output with k rows per image: forward reads B*k rows, writes B rows;
    backward reads grad (B rows) and the B*k expert rows, writes B*k grad rows."""
    n = math.prod(shape) * _es(dtype)
    return (1 + 2 * k) * n if backward else (k + 1) * n


def roofline_info(ms: float, nbytes: int) -> dict:
    """extra_info entries: bytes, roofline time, achieved fraction of the copy bandwidth."""
    bw = copy_bandwidth()
    roof_ms = nbytes / bw * 1e3
    return {"ms": ms, "bytes": nbytes, "copy_GBps": bw / 1e9, "roofline_ms": roof_ms,
            "roofline_fraction": roof_ms / ms if ms > 0 else float("nan"),
            "achieved_GBps": nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")}


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn: Callable[[], object], replays: int = 50) -> float:
    """Median-free mean milliseconds of ``fn`` captured once in a CUDA graph and replayed (warm-up on a
    side stream first); raises if ``fn`` synchronises with the host during capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays
