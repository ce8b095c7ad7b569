"""Closed-form backward formulas shared by the reference implementations.

Op implementations run below PyTorch's autograd, so every reference backward is written out
explicitly here (no autograd, no functorch): plain tensor algebra that opcheck can trace.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def conv1x1_grads(g: Tensor, x: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """For ``y = conv2d(x, w)`` with a 1x1 kernel: (grad_x, grad_w)."""
    gx = F.conv2d(g, w.transpose(0, 1))
    gw = torch.einsum("bohw,bihw->oi", g, x)[..., None, None]
    return gx, gw


def depthwise_grads(g: Tensor, y: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """For ``z = conv2d(y, w, padding=k//2, groups=C)``: (grad_y, grad_w)."""
    pad, groups = w.shape[-1] // 2, w.shape[0]
    gy = torch.nn.grad.conv2d_input(y.shape, w, g, padding=pad, groups=groups)
    gw = torch.nn.grad.conv2d_weight(y, w.shape, g, padding=pad, groups=groups)
    return gy, gw


def pointwise_depthwise_grads(g: Tensor, x: Tensor, pw_w: Tensor, dw_w: Tensor, pw_b: Optional[Tensor]):
    """For ``z = dw(pw(x) + pw_b) + dw_b``: (gx, g_pw_w, g_dw_w, g_pw_b, g_dw_b)."""
    y = F.conv2d(x, pw_w, pw_b)
    gy, gdw = depthwise_grads(g, y, dw_w)
    gx, gpw = conv1x1_grads(gy, x, pw_w)
    return gx, gpw, gdw, gy.sum((0, 2, 3)), g.sum((0, 2, 3))


def gelu_grad(a: Tensor) -> Tensor:
    """d/da of the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    return cdf + a * pdf


def silu_grad(a: Tensor) -> Tensor:
    s = torch.sigmoid(a)
    return s * (1.0 + a * (1.0 - s))


def channel_layer_norm_grads(g: Tensor, x: Tensor, w: Tensor, eps: float,
                             centred: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """For ``y = LN_C(x) * w + b`` (biased variance over dim 1): (grad_x, grad_w, grad_b).

    ``centred=False`` is the BiasFree form ``y = x * rstd * w`` (x not centred, the variance still
    around the mean; grad_b is then the gradient a bias would have had)."""
    mu = x.mean(1, keepdim=True)
    rstd = torch.rsqrt(x.var(1, keepdim=True, unbiased=False) + eps)
    xhat = (x - mu) * rstd
    z = xhat if centred else x * rstd  # what w multiplies
    gxhat = g * w[:, None, None]
    gx = gxhat - gxhat.mean(1, keepdim=True) if centred else gxhat
    gx = gx - xhat * (gxhat * z).mean(1, keepdim=True)
    return rstd * gx, (g * z).sum((0, 2, 3)), g.sum((0, 2, 3))


def cv_squared_grad(v: Tensor) -> Tensor:
    """d/dv of ``(std(v) / (mean(v) + 1e-8))**2`` (unbiased std)."""
    n = v.numel()
    m = v.mean()
    var = v.var()
    return 2.0 * (v - m) / (n - 1) / (m + 1e-8) ** 2 - 2.0 * var / (m + 1e-8) ** 3 / n
