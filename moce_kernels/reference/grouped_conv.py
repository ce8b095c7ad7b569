"""Reference helpers for the grouped expert stage.

``window_attention_rows`` / ``window_attention_rows_backward``: the row-segment API of the window
attention family, built on the reference op (forward and closed-form backward). They read ``rows``
on the host (a synchronisation), so the grouped expert stage uses them only for float64 inputs,
which the Triton and CUDA kernels do not take.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import window_attention as wattn


def window_attention_rows(q, k, v, window_size: int, norm_weight, norm_bias, eps: float, out: torch.Tensor,
                          rows: torch.Tensor) -> None:
    """Writes rows [rows[0], rows[1]) of ``out`` (N, r, H, W) with the window attention of those rows."""
    lo, hi = (int(t) for t in rows.tolist())
    if hi > lo:
        with torch.no_grad():
            out[lo:hi] = wattn.window_fft_attention(q[lo:hi], k[lo:hi], v[lo:hi], window_size, norm_weight,
                                                     norm_bias, eps)


def window_attention_rows_backward(grad, q, k, v, window_size: int, norm_weight, norm_bias, eps: float,
                                   grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor,
                                   rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Writes rows [lo, hi) of grad_q/k/v; returns (grad_norm_weight, grad_norm_bias) over those rows."""
    lo, hi = (int(t) for t in rows.tolist())
    if hi <= lo:
        return torch.zeros_like(norm_weight), torch.zeros_like(norm_bias)
    gq, gk, gv, gw, gb = wattn.window_fft_attention_backward(grad[lo:hi], q[lo:hi], k[lo:hi], v[lo:hi],
                                                            window_size, norm_weight, norm_bias, eps)
    grad_q[lo:hi] = gq
    grad_k[lo:hi] = gk
    grad_v[lo:hi] = gv
    return gw, gb
