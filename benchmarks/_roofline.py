"""Ceilings shared by every benchmark suite, measured once per session on the device."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes/s of a large device-to-device copy (read + write counted), median of do_bench."""
    import triton.testing

    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2.0 * n * 4 / (ms * 1e-3)
