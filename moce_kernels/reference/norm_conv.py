"""Reference LayerNorm -> 1x1 (-> depthwise) convolutions and the 1x1 with a residual (ATen ops).

The LayerNorm is computed exactly as the model's trunk ``LayerNorm`` computes it (same operations in
the same order), so ``layer_norm_pointwise_depthwise_conv`` here equals the unfused trunk bit for bit.
The backward formulas are closed form (:mod:`.grads`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ..backends import register
from .expert_conv import pointwise_depthwise_conv, pointwise_depthwise_conv_backward, pointwise_depthwise_conv_gated
from .grads import channel_layer_norm_grads, conv1x1_grads

Tensor = torch.Tensor


def layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> Tensor:
    """LayerNorm over dim 1 of NCHW x: WithBias ``(x - mean) * rstd * weight + bias``, BiasFree
    (``bias`` None) ``x * rstd * weight``; biased variance around the mean."""
    mu = x.mean(1, keepdim=True)
    xc = x - mu
    inv = torch.rsqrt((xc * xc).mean(1, keepdim=True) + eps)
    w = weight[:, None, None]
    if bias is None:
        return x * inv * w
    return torch.addcmul(bias[:, None, None], xc * inv, w)


def _layer_norm_grads(gn: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float) -> List[Tensor]:
    """[grad_x, grad_weight] (+ [grad_bias] when the LayerNorm has a bias)."""
    gx, gw, gb = channel_layer_norm_grads(gn, x, weight, eps, centred=bias is not None)
    return [gx, gw] + ([gb] if bias is not None else [])


def layer_norm_pointwise_depthwise_conv(x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias, dw_bias, eps,
                                        gated: bool = False) -> Tensor:
    fn = pointwise_depthwise_conv_gated if gated else pointwise_depthwise_conv
    return fn(layer_norm(x, norm_weight, norm_bias, eps), pw_weight, dw_weight, pw_bias, dw_bias)


def layer_norm_pointwise_depthwise_conv_backward(grad, x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias,
                                                 dw_bias, eps, gated: bool) -> List[Tensor]:
    """[grad_x, grad_norm_weight, (grad_norm_bias), grad_pw, grad_dw, (grad_pw_bias), (grad_dw_bias)]."""
    n = layer_norm(x, norm_weight, norm_bias, eps)
    gn, *conv = pointwise_depthwise_conv_backward(grad, n, pw_weight, dw_weight, pw_bias, dw_bias, gated)
    return [t.contiguous() for t in _layer_norm_grads(gn, x, norm_weight, norm_bias, eps) + conv]


def layer_norm_pointwise_conv(x, norm_weight, norm_bias, weight, bias, eps, chunks: int) -> Tensor:
    """(chunks, B, C_out/chunks, H, W): the chunks of ``conv2d(LN(x), weight, bias)`` stacked."""
    y = F.conv2d(layer_norm(x, norm_weight, norm_bias, eps), weight, bias)
    return torch.stack(y.chunk(chunks, dim=1))


def layer_norm_pointwise_conv_backward(grad, x, norm_weight, norm_bias, weight, bias, eps, chunks) -> List[Tensor]:
    """[grad_x, grad_norm_weight, (grad_norm_bias), grad_weight, (grad_bias)]; grad is (chunks, B, C, H, W)."""
    g = torch.cat(grad.unbind(0), dim=1)
    gn, gw = conv1x1_grads(g, layer_norm(x, norm_weight, norm_bias, eps), weight)
    out = _layer_norm_grads(gn, x, norm_weight, norm_bias, eps) + [gw]
    out += [g.sum((0, 2, 3))] if bias is not None else []
    return [t.contiguous() for t in out]


def pointwise_conv(x, weight, bias, residual) -> Tensor:
    y = F.conv2d(x, weight, bias)
    return y if residual is None else y + residual


def pointwise_conv_backward(grad, x, weight, bias) -> List[Tensor]:
    """[grad_x, grad_weight, (grad_bias)] (the residual's gradient is grad itself)."""
    gx, gw = conv1x1_grads(grad, x, weight)
    return [t.contiguous() for t in [gx, gw] + ([grad.sum((0, 2, 3))] if bias is not None else [])]


def _no_grad(fn):
    """``fn`` with a contiguous tensor result (the op runs it below autograd: nothing is recorded)."""
    def run(*args):
        out = fn(*args)
        return out.contiguous() if isinstance(out, Tensor) else out
    return run


for _gated, _suffix in ((False, ""), (True, "_gated")):
    _name = "layer_norm_pointwise_depthwise_conv" + _suffix
    register(_name, "reference")(_no_grad(lambda *a, g=_gated: layer_norm_pointwise_depthwise_conv(*a, gated=g)))
    register(_name + "_backward", "reference")(
        _no_grad(lambda *a, g=_gated: layer_norm_pointwise_depthwise_conv_backward(*a, gated=g)))
register("layer_norm_pointwise_conv", "reference")(_no_grad(layer_norm_pointwise_conv))
register("layer_norm_pointwise_conv_backward", "reference")(_no_grad(layer_norm_pointwise_conv_backward))
register("pointwise_conv", "reference")(_no_grad(pointwise_conv))
register("pointwise_conv_backward", "reference")(_no_grad(pointwise_conv_backward))
