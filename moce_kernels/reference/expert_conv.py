"""Reference pointwise -> depthwise convolutions (cuDNN / ATen convolutions)."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..backends import register
from ._vjp import vjp


def pointwise_depthwise_conv(x, pw_weight, dw_weight, pw_bias=None, dw_bias=None) -> torch.Tensor:
    y = F.conv2d(x, pw_weight, pw_bias)
    ks = dw_weight.shape[-1]
    return F.conv2d(y, dw_weight, dw_bias, padding=ks // 2, groups=dw_weight.shape[0])


def pointwise_depthwise_conv_gated(x, pw_weight, dw_weight, pw_bias=None, dw_bias=None) -> torch.Tensor:
    a, b = pointwise_depthwise_conv(x, pw_weight, dw_weight, pw_bias, dw_bias).chunk(2, dim=1)
    return F.gelu(a) * b


def _grads(fn, grad, x, pw_weight, dw_weight, pw_bias, dw_bias) -> List[torch.Tensor]:
    """[grad_x, grad_pw, grad_dw] plus the grads of the biases that are present."""
    present = [t is not None for t in (pw_bias, dw_bias)]
    inputs = [t for t in (x, pw_weight, dw_weight, pw_bias, dw_bias) if t is not None]

    def f(*args):
        it = iter(args[3:])
        pb = next(it) if present[0] else None
        db = next(it) if present[1] else None
        return fn(args[0], args[1], args[2], pb, db)

    return [g.contiguous() for g in vjp(f, grad, *inputs)]


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
    return _grads(pointwise_depthwise_conv, grad, x, pw_weight, dw_weight, pw_bias, dw_bias)


@register("pointwise_depthwise_conv_gated_backward", "reference")
def _bwd_gated(grad, x, pw_weight, dw_weight, pw_bias, dw_bias):
    return _grads(pointwise_depthwise_conv_gated, grad, x, pw_weight, dw_weight, pw_bias, dw_bias)
