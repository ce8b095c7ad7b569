"""Pointwise -> depthwise convolution, and its GELU-gated variant (GDFN).

``pointwise_depthwise_conv(x, pw_weight, dw_weight, pw_bias, dw_bias)`` equals
``conv2d(conv2d(x, pw_weight, pw_bias), dw_weight, dw_bias, padding=k//2, groups=C_out)``.
The gated variant splits that result into halves a, b along channels and returns
``gelu(a) * b`` (exact erf GELU), C_out/2 channels.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ._common import FLOAT_DTYPES, call_impl, check_same, check_tensor

OP = "pointwise_depthwise_conv"
KERNEL_SIZES = (3, 5, 7)


def _out_channels(pw_weight: torch.Tensor, gated: bool) -> int:
    return pw_weight.shape[0] // 2 if gated else pw_weight.shape[0]


def _define(gated: bool):
    name = OP + ("_gated" if gated else "")

    @torch.library.custom_op(f"moce::{name}", mutates_args=())
    def fwd(x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor,
            pw_bias: Optional[torch.Tensor], dw_bias: Optional[torch.Tensor]) -> torch.Tensor:
        return call_impl(name, x.device, x, pw_weight, dw_weight, pw_bias, dw_bias)

    @fwd.register_fake
    def _(x, pw_weight, dw_weight, pw_bias, dw_bias):
        B, _, H, W = x.shape
        return x.new_empty(B, _out_channels(pw_weight, gated), H, W)

    @torch.library.custom_op(f"moce::{name}_backward", mutates_args=())
    def bwd(grad: torch.Tensor, x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor,
            pw_bias: Optional[torch.Tensor], dw_bias: Optional[torch.Tensor]) -> List[torch.Tensor]:
        return list(call_impl(name + "_backward", x.device, grad, x, pw_weight, dw_weight, pw_bias, dw_bias))

    @bwd.register_fake
    def _(grad, x, pw_weight, dw_weight, pw_bias, dw_bias):
        out = [torch.empty_like(x), torch.empty_like(pw_weight), torch.empty_like(dw_weight)]
        out += [torch.empty_like(b) for b in (pw_bias, dw_bias) if b is not None]
        return out

    def setup(ctx, inputs, output):
        x, pw_weight, dw_weight, pw_bias, dw_bias = inputs
        ctx.has_bias = (pw_bias is not None, dw_bias is not None)
        ctx.save_for_backward(x, pw_weight, dw_weight, pw_bias, dw_bias)

    def backward(ctx, grad):
        x, pw_weight, dw_weight, pw_bias, dw_bias = ctx.saved_tensors
        grads = list(bwd(grad.contiguous(), x, pw_weight, dw_weight, pw_bias, dw_bias))
        gx, gpw, gdw = grads[:3]
        rest = iter(grads[3:])
        gpb = next(rest) if ctx.has_bias[0] else None
        gdb = next(rest) if ctx.has_bias[1] else None
        return gx, gpw, gdw, gpb, gdb

    fwd.register_autograd(backward, setup_context=setup)
    return fwd


_pw_dw = _define(gated=False)
_pw_dw_gated = _define(gated=True)


def check_inputs(x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor,
                 pw_bias: Optional[torch.Tensor], dw_bias: Optional[torch.Tensor], gated: bool) -> None:
    """Raise a clear error for any input the op does not accept."""
    check_tensor("x", x, 4, FLOAT_DTYPES)
    check_tensor("pw_weight", pw_weight, 4, FLOAT_DTYPES)
    check_tensor("dw_weight", dw_weight, 4, FLOAT_DTYPES)
    c_out, c_in = pw_weight.shape[0], x.shape[1]
    if tuple(pw_weight.shape[1:]) != (c_in, 1, 1):
        raise ValueError(f"pw_weight must have shape (C_out, {c_in}, 1, 1) for x with {c_in} channels, "
                         f"got {tuple(pw_weight.shape)}")
    ks = dw_weight.shape[-1]
    if ks not in KERNEL_SIZES or tuple(dw_weight.shape) != (c_out, 1, ks, ks):
        raise ValueError(f"dw_weight must have shape ({c_out}, 1, k, k) with k in {KERNEL_SIZES}, "
                         f"got {tuple(dw_weight.shape)}")
    for n, b in (("pw_bias", pw_bias), ("dw_bias", dw_bias)):
        if b is not None:
            check_tensor(n, b, 1, FLOAT_DTYPES)
            if b.shape[0] != c_out:
                raise ValueError(f"{n} must have {c_out} entries, got {b.shape[0]}")
    if gated and c_out % 2:
        raise ValueError(f"the gated variant needs an even C_out, got {c_out}")
    names = ("x", "pw_weight", "dw_weight", "pw_bias", "dw_bias")
    tensors = (x, pw_weight, dw_weight, pw_bias, dw_bias)
    check_same(names, tensors, "device")
    check_same(names, tensors, "dtype")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")


def _call(fn, gated, x, pw_weight, dw_weight, pw_bias, dw_bias):
    check_inputs(x, pw_weight, dw_weight, pw_bias, dw_bias, gated)
    cont = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return fn(x.contiguous(), pw_weight.contiguous(), dw_weight.contiguous(), cont(pw_bias), cont(dw_bias))


def pointwise_depthwise_conv(x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor,
                             pw_bias: Optional[torch.Tensor] = None,
                             dw_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1x1 conv then depthwise k x k conv ("same" zero padding).

    Args:
        x: (B, C_in, H, W).  pw_weight: (C_out, C_in, 1, 1).  dw_weight: (C_out, 1, k, k), k in {3, 5, 7}.
        pw_bias, dw_bias: optional (C_out,).
    Returns:
        (B, C_out, H, W) in x's dtype.
    """
    return _call(_pw_dw, False, x, pw_weight, dw_weight, pw_bias, dw_bias)


def pointwise_depthwise_conv_gated(x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor,
                                   pw_bias: Optional[torch.Tensor] = None,
                                   dw_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a, b = split(pointwise_depthwise_conv(...))``; returns ``gelu(a) * b``, (B, C_out/2, H, W)."""
    return _call(_pw_dw_gated, True, x, pw_weight, dw_weight, pw_bias, dw_bias)
