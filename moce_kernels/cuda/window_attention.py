"""CUDA C++ window FFT attention (``torch.ops.moce_C.window_fft_attention*``), registered as backend ``cuda``.

``window_attention_rows`` / ``window_attention_rows_backward`` have the same signatures and semantics
as those of :mod:`moce_kernels.triton.window_attention`: only batch rows ``rows[0] <= n < rows[1]``
(``rows`` an int64 (2,) device tensor, never read on the host) are computed and written.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import extension  # noqa: F401  (registers torch.ops.moce_C)

from ..backends import FP32_AND_16BIT, register_all
from ..expert_stage.implementations import window_attention_implementations

WINDOW_SIZES = (4, 8, 16, 32)


def _check(q: torch.Tensor, window_size: int, rows: torch.Tensor, *like: torch.Tensor) -> None:
    """Python-side checks mirroring the Triton entry points (the C++ op checks again)."""
    if window_size not in WINDOW_SIZES:
        raise ValueError(f"window_size {window_size!r}: the cuda backend's window attention takes "
                         f"{WINDOW_SIZES}; run this op with backend 'triton' or 'reference'")
    for t in like:
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device or not t.is_contiguous():
            raise ValueError("all (N, C, H, W) tensors must match q in shape, dtype and device and be contiguous")
    if rows.dtype != torch.int64 or rows.numel() != 2 or rows.device != q.device:
        raise ValueError("rows must be an int64 tensor of 2 elements on q's device")


def window_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                          norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                          out: torch.Tensor, rows: torch.Tensor) -> None:
    """Forward on batch rows [rows[0], rows[1]) into ``out`` (N, C, H, W); other rows untouched."""
    _check(q, window_size, rows, k, v, out)
    torch.ops.moce_C.window_fft_attention_rows(q, k, v, int(window_size), norm_weight, norm_bias, float(eps),
                                               out, rows)


def window_attention_rows_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   window_size: int, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                                   eps: float, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor,
                                   rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward on batch rows [rows[0], rows[1]): writes those rows of grad_q/k/v and returns
    (grad_norm_weight, grad_norm_bias) float32 (C,) summed over those rows only."""
    _check(q, window_size, rows, grad, k, v, grad_q, grad_k, grad_v)
    gw, gb = torch.ops.moce_C.window_fft_attention_rows_backward(
        grad, q, k, v, int(window_size), norm_weight, norm_bias, float(eps), grad_q, grad_k, grad_v, rows)
    return gw, gb


def _takes(window_size: int) -> Optional[str]:
    return None if window_size in WINDOW_SIZES else (f"window_size {window_size}: the cuda backend's window "
                                                     f"attention takes {WINDOW_SIZES}")


register_all("cuda", window_attention_implementations(window_attention_rows, window_attention_rows_backward),
             dtypes=FP32_AND_16BIT,
             checks={"window_fft_attention": lambda q, k, v, p, *rest: _takes(p),
                     "window_fft_attention_backward": lambda g, q, k, v, p, *rest: _takes(p)})
