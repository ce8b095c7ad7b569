"""Reference pointwise -> depthwise convolutions (cuDNN / ATen convolutions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import register
from .grads import gelu_grad, pointwise_depthwise_grads


def pointwise_depthwise_conv(x, pw_weight, dw_weight, pw_bias=None, dw_bias=None) -> torch.Tensor:
    y = F.conv2d(x, pw_weight, pw_bias)
    ks = dw_weight.shape[-1]
    return F.conv2d(y, dw_weight, dw_bias, padding=ks // 2, groups=dw_weight.shape[0])


def pointwise_depthwise_conv_gated(x, pw_weight, dw_weight, pw_bias=None, dw_bias=None) -> torch.Tensor:
    a, b = pointwise_depthwise_conv(x, pw_weight, dw_weight, pw_bias, dw_bias).chunk(2, dim=1)
    return F.gelu(a) * b


def pointwise_depthwise_conv_backward(grad, x, pw_weight, dw_weight, pw_bias, dw_bias, gated: bool):
    """Closed form: [grad_x, grad_pw, grad_dw] plus the grads of the biases that are present."""
    if gated:
        a, b = pointwise_depthwise_conv(x, pw_weight, dw_weight, pw_bias, dw_bias).chunk(2, dim=1)
        grad = torch.cat([grad * b * gelu_grad(a), grad * F.gelu(a)], dim=1)
    gx, gpw, gdw, gpb, gdb = pointwise_depthwise_grads(grad, x, pw_weight, dw_weight, pw_bias)
    out = [gx, gpw, gdw] + [g for g, b in ((gpb, pw_bias), (gdb, dw_bias)) if b is not None]
    return [t.contiguous() for t in out]


@register("pointwise_depthwise_conv", "reference")
def _fwd(x, pw_weight, dw_weight, pw_bias, dw_bias):
    with torch.no_grad():
        return pointwise_depthwise_conv(x, pw_weight, dw_weight, pw_bias, dw_bias).contiguous()


@register("pointwise_depthwise_conv_gated", "reference")
def _fwd_gated(x, pw_weight, dw_weight, pw_bias, dw_bias):
    with torch.no_grad():
        return pointwise_depthwise_conv_gated(x, pw_weight, dw_weight, pw_bias, dw_bias).contiguous()


@register("pointwise_depthwise_conv_backward", "reference")
def _bwd(grad, x, pw_weight, dw_weight, pw_bias, dw_bias):
    with torch.no_grad():
        return pointwise_depthwise_conv_backward(grad, x, pw_weight, dw_weight, pw_bias, dw_bias, gated=False)


@register("pointwise_depthwise_conv_gated_backward", "reference")
def _bwd_gated(grad, x, pw_weight, dw_weight, pw_bias, dw_bias):
    with torch.no_grad():
        return pointwise_depthwise_conv_backward(grad, x, pw_weight, dw_weight, pw_bias, dw_bias, gated=True)
