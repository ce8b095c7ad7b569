"""Window FFT attention: ``LN_C(crop(circconv_p(q, k))) * v`` in p x p windows.

Inside every non-overlapping p x p window (q and k zero-padded at the bottom/right to a
multiple of p) and every channel, the 2-D circular convolution of q with k
(``irfft2(rfft2(q) * rfft2(k))``, no conjugate); the result is cropped back to H x W,
layer-normalised over channels (biased variance, ``eps``), and multiplied by v.
"""
from __future__ import annotations

import torch

from ._common import check_positive, check_same, check_tensors
from ._declare import Backward, autocast_entry, declare

OP = "window_fft_attention"
WINDOW_SIZES = (4, 8, 16, 32, 64)


def _fake(q, k, v, window_size, norm_weight, norm_bias, eps):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _backward_fake(grad, q, k, v, window_size, norm_weight, norm_bias, eps):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(norm_weight), torch.empty_like(norm_bias))


def _setup(ctx, inputs, output):
    q, k, v, window_size, norm_weight, norm_bias, eps = inputs
    ctx.save_for_backward(q, k, v, norm_weight, norm_bias)
    ctx.window_size, ctx.eps = window_size, eps


def _backward(ctx, grad):
    q, k, v, w, b = ctx.saved_tensors
    gq, gk, gv, gw, gb = DECLARATION.backward.op(grad.contiguous(), q, k, v, ctx.window_size, w, b, ctx.eps)
    return gq, gk, gv, None, gw, gb, None


def shape_class(q, k, v, window_size, *rest):
    """What the implementations' checks read: the window size (the cuda backend takes p <= 32)."""
    return window_size


def backward_shape_class(grad, q, k, v, window_size, *rest):
    return window_size


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                 norm_weight: torch.Tensor, norm_bias: torch.Tensor) -> None:
    """Raise a clear error for any input the op does not accept."""
    check_tensors(("q", q, 4, False), ("k", k, 4, False), ("v", v, 4, False), ("norm_weight", norm_weight, 1, False),
                  ("norm_bias", norm_bias, 1, False))
    for n, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{n} has shape {tuple(t.shape)} but q has shape {tuple(q.shape)}; they must match")
    for n, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t.shape[0] != q.shape[1]:
            raise ValueError(f"{n} has {t.shape[0]} entries but q has {q.shape[1]} channels")
    check_same(("q", "k", "v", "norm_weight", "norm_bias"), (q, k, v, norm_weight, norm_bias), "device")
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("norm_weight", "norm_bias"), (norm_weight, norm_bias), "dtype")
    if isinstance(window_size, bool) or window_size not in WINDOW_SIZES:
        raise ValueError(f"window_size must be one of {WINDOW_SIZES}, got {window_size!r}")
    if 0 in q.shape:
        raise ValueError(f"q is empty (shape {tuple(q.shape)}); B, C, H and W must all be >= 1")


DECLARATION = declare(
    OP, "(Tensor q, Tensor k, Tensor v, SymInt window_size, Tensor norm_weight, Tensor norm_bias, float eps) -> Tensor",
    family="window attention", fake=_fake, check=check_inputs, shape_class=shape_class,
    backward=Backward("(Tensor grad, Tensor q, Tensor k, Tensor v, SymInt window_size, Tensor norm_weight, "
                      "Tensor norm_bias, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                      _backward_fake, _setup, _backward, shape_class=backward_shape_class),
    # measured (H200, 2026-11-26, benchmarks/results/2026-11-26-h200): the Triton kernels beat torch.fft
    # (1.4-8.6x in bf16)
    cuda_order=("triton", "reference", "cuda"))
_op = DECLARATION.op


@autocast_entry
def window_fft_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                         norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused window FFT attention.

    Args:
        q, k, v: (B, C, H, W), one floating dtype; low precision accumulates in float32.
        window_size: p in {4, 8, 16, 32, 64} (the cuda backend takes p <= 32).
        norm_weight, norm_bias: (C,) LayerNorm affine parameters.
        eps: LayerNorm epsilon.
    Returns:
        (B, C, H, W) in q's dtype: ``LN_C(crop(circconv_p(q, k))) * v``.
    """
    check_inputs(q, k, v, window_size, norm_weight, norm_bias)
    check_positive("eps", eps)
    return _op(q.contiguous(), k.contiguous(), v.contiguous(), int(window_size), norm_weight.contiguous(),
               norm_bias.contiguous(), float(eps))


# the public entry points (moce_kernels.ops exports these names)
__all__ = ["window_fft_attention"]
