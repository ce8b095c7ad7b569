"""Reference window FFT attention (torch.fft), forward and backward by autograd."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..backends import register
from ._vjp import vjp


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def circular_window_conv(q: torch.Tensor, k: torch.Tensor, p: int) -> torch.Tensor:
    """Per p x p window and channel, the circular convolution of q with k, cropped to (H, W)."""
    B, C, H, W = q.shape
    ph, pw = (-H) % p, (-W) % p
    Hp, Wp = H + ph, W + pw

    def windows(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, pw, 0, ph))
        return t.view(B, C, Hp // p, p, Wp // p, p).transpose(3, 4)

    out = torch.fft.irfft2(torch.fft.rfft2(windows(q)) * torch.fft.rfft2(windows(k)), s=(p, p))
    return out.transpose(3, 4).reshape(B, C, Hp, Wp)[:, :, :H, :W]


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over dim 1 of an NCHW tensor (biased variance)."""
    mu = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def window_fft_attention(q, k, v, window_size: int, norm_weight, norm_bias, eps: float = 1e-5) -> torch.Tensor:
    """Differentiable reference; computes in float32 (float64 for float64 inputs)."""
    cdt = _compute_dtype(q.dtype)
    conv = circular_window_conv(q.to(cdt), k.to(cdt), window_size)
    out = channel_layer_norm(conv, norm_weight.to(cdt), norm_bias.to(cdt), eps) * v.to(cdt)
    return out.to(q.dtype)


@register("window_fft_attention", "reference")
def _forward(q, k, v, window_size, norm_weight, norm_bias, eps):
    with torch.no_grad():
        return window_fft_attention(q, k, v, window_size, norm_weight, norm_bias, eps).contiguous()


@register("window_fft_attention_backward", "reference")
def _backward(grad, q, k, v, window_size, norm_weight, norm_bias, eps) -> Tuple[torch.Tensor, ...]:
    fn = lambda q_, k_, v_, w_, b_: window_fft_attention(q_, k_, v_, window_size, w_, b_, eps)  # noqa: E731
    return tuple(g.contiguous() for g in vjp(fn, grad, q, k, v, norm_weight, norm_bias))
