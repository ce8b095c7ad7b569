"""Reference window FFT attention (torch.fft), forward and backward by autograd."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..backends import register
from .grads import channel_layer_norm_grads


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _windows(t: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> zero-padded (B, C, Hp/p, Wp/p, p, p) windows."""
    B, C, H, W = t.shape
    ph, pw = (-H) % p, (-W) % p
    t = F.pad(t, (0, pw, 0, ph))
    return t.view(B, C, (H + ph) // p, p, (W + pw) // p, p).transpose(3, 4)


def _unwindows(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    B, C, nh, nw, p, _ = t.shape
    return t.transpose(3, 4).reshape(B, C, nh * p, nw * p)[:, :, :H, :W]


def _circular(a: torch.Tensor, b: torch.Tensor, p: int, conj_b: bool = False) -> torch.Tensor:
    """Per window: circular convolution of a with b (cross-correlation with ``conj_b``)."""
    fb = torch.fft.rfft2(b)
    return torch.fft.irfft2(torch.fft.rfft2(a) * (torch.conj_physical(fb) if conj_b else fb), s=(p, p))


def circular_window_conv(q: torch.Tensor, k: torch.Tensor, p: int) -> torch.Tensor:
    """Per p x p window and channel, the circular convolution of q with k, cropped to (H, W)."""
    return _unwindows(_circular(_windows(q, p), _windows(k, p), p), q.shape[2], q.shape[3])


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


def window_fft_attention_backward(grad, q, k, v, window_size: int, norm_weight, norm_bias, eps: float):
    """Closed form: (grad_q, grad_k, grad_v, grad_norm_weight, grad_norm_bias) in the inputs' dtypes.

    With ``c = circconv(q, k)``, ``y = LN(c)``, ``out = y * v``: ``gv = g * y``; ``gc`` from the
    LayerNorm backward of ``g * v``; ``gq = crosscorr(gc, k)``, ``gk = crosscorr(gc, q)`` per window.
    """
    cdt = _compute_dtype(q.dtype)
    p, (H, W) = window_size, q.shape[2:]
    qc, kc, vc, g = q.to(cdt), k.to(cdt), v.to(cdt), grad.to(cdt)
    conv = circular_window_conv(qc, kc, p)
    y = channel_layer_norm(conv, norm_weight.to(cdt), norm_bias.to(cdt), eps)
    gconv, gw, gb = channel_layer_norm_grads(g * vc, conv, norm_weight.to(cdt), eps)
    gcw = _windows(gconv, p)
    gq = _unwindows(_circular(gcw, _windows(kc, p), p, conj_b=True), H, W)
    gk = _unwindows(_circular(gcw, _windows(qc, p), p, conj_b=True), H, W)
    return (gq.to(q.dtype), gk.to(k.dtype), (g * y).to(v.dtype), gw.to(norm_weight.dtype),
            gb.to(norm_bias.dtype))


@register("window_fft_attention_backward", "reference")
def _backward(grad, q, k, v, window_size, norm_weight, norm_bias, eps) -> Tuple[torch.Tensor, ...]:
    with torch.no_grad():
        grads = window_fft_attention_backward(grad, q, k, v, window_size, norm_weight, norm_bias, eps)
    return tuple(g.contiguous() for g in grads)


# ----------------------------------------------------------------------------- batch-row entry points
def window_attention_rows(q, k, v, window_size: int, norm_weight, norm_bias, eps: float, out: torch.Tensor,
                          rows: torch.Tensor) -> None:
    """Writes rows [rows[0], rows[1]) of ``out`` (N, C, H, W) with the window attention of those rows.

    The row-segment entry point of the Triton and CUDA backends, here for the float64 expert stage
    of the Triton backend (whose window-attention kernels do not take float64). Reads ``rows`` on
    the host (a synchronisation)."""
    lo, hi = (int(t) for t in rows.tolist())
    if hi > lo:
        with torch.no_grad():
            out[lo:hi] = window_fft_attention(q[lo:hi], k[lo:hi], v[lo:hi], window_size, norm_weight, norm_bias, eps)


def window_attention_rows_backward(grad, q, k, v, window_size: int, norm_weight, norm_bias, eps: float,
                                   grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor,
                                   rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Writes rows [lo, hi) of grad_q/k/v; returns (grad_norm_weight, grad_norm_bias) over those rows."""
    lo, hi = (int(t) for t in rows.tolist())
    if hi <= lo:
        return torch.zeros_like(norm_weight), torch.zeros_like(norm_bias)
    gq, gk, gv, gw, gb = window_fft_attention_backward(grad[lo:hi], q[lo:hi], k[lo:hi], v[lo:hi], window_size,
                                                       norm_weight, norm_bias, eps)
    grad_q[lo:hi] = gq
    grad_k[lo:hi] = gk
    grad_v[lo:hi] = gv
    return gw, gb
