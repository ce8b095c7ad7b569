"""Pointwise -> depthwise convolution, and its GELU-gated variant (GDFN).

``pointwise_depthwise_conv(x, pw_weight, dw_weight, pw_bias, dw_bias)`` equals
``conv2d(conv2d(x, pw_weight, pw_bias), dw_weight, dw_bias, padding=k//2, groups=C_out)``.
The gated variant splits that result into halves a, b along channels and returns
``gelu(a) * b`` (exact erf GELU), C_out/2 channels.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import check_conv1x1, check_same, check_tensors
from ._declare import OpDeclaration, autocast_entry, declare_simple

OP = "pointwise_depthwise_conv"
KERNEL_SIZES = (3, 5, 7)


def _out_channels(pw_weight: torch.Tensor, gated: bool) -> int:
    return pw_weight.shape[0] // 2 if gated else pw_weight.shape[0]


_CONV_PARAMS = [("Tensor", "pw_weight"), ("Tensor", "dw_weight"), ("Tensor?", "pw_bias"), ("Tensor?", "dw_bias")]
_NORM_PARAMS = [("Tensor", "norm_weight"), ("Tensor?", "norm_bias")]


# measured (H200, 2026-11-26, benchmarks/results/2026-11-26-h200): cuDNN's convolutions beat both fused
# pw->dw kernels
CUDA_ORDER = ("reference", "cuda", "triton")


def declare_pointwise_depthwise_op(gated: bool, norm: bool = False) -> OpDeclaration:
    """The declaration of op ``moce::[layer_norm_]pointwise_depthwise_conv[_gated]``, its backward op and autograd
    formula. Inputs ``(x, pw_weight, dw_weight, pw_bias, dw_bias)``; with ``norm`` (a LayerNorm over x's
    channels first, see :mod:`.norm_conv`) ``(x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias,
    dw_bias, eps)``. Output (B, C_out, H, W), or (B, C_out/2, H, W) when ``gated``."""
    name = ("layer_norm_" if norm else "") + OP + ("_gated" if gated else "")
    params = [("Tensor", "x")] + (_NORM_PARAMS if norm else []) + _CONV_PARAMS + ([("float", "eps")] if norm else [])
    pw_index = 3 if norm else 1

    def out_shape(*args):
        B, _, H, W = args[0].shape
        return (B, _out_channels(args[pw_index], gated), H, W)

    if norm:  # the fused trunk ops: Triton first, by count (see channel_attention)
        return declare_simple(name, params, out_shape, family="LN+1x1+depthwise", cuda_order=("triton", "reference"))
    return declare_simple(name, params, out_shape, family="1x1+depthwise", cuda_order=CUDA_ORDER)


def check_inputs(x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor,
                 pw_bias: Optional[torch.Tensor], dw_bias: Optional[torch.Tensor], gated: bool) -> None:
    """Raise a clear error for any input the op does not accept."""
    c_out = check_conv1x1(x, pw_weight, pw_bias, ("pw_weight", "pw_bias"))
    check_tensors(("dw_weight", dw_weight, 4, False), ("dw_bias", dw_bias, 1, True))
    ks = dw_weight.shape[-1]
    if ks not in KERNEL_SIZES or dw_weight.shape != (c_out, 1, ks, ks):
        raise ValueError(f"dw_weight must have shape ({c_out}, 1, k, k) with k in {KERNEL_SIZES}, "
                         f"got {tuple(dw_weight.shape)}")
    if dw_bias is not None:
        if dw_bias.shape[0] != c_out:
            raise ValueError(f"dw_bias must have {c_out} entries, got {dw_bias.shape[0]}")
    if gated and c_out % 2:
        raise ValueError(f"the gated variant needs an even C_out, got {c_out}")
    names = ("x", "pw_weight", "dw_weight", "pw_bias", "dw_bias")
    tensors = (x, pw_weight, dw_weight, pw_bias, dw_bias)
    check_same(names, tensors, "both")
    if 0 in x.shape:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")


PW_DW = declare_pointwise_depthwise_op(gated=False)
PW_DW_GATED = declare_pointwise_depthwise_op(gated=True)


def _call(fn, gated, x, pw_weight, dw_weight, pw_bias, dw_bias):
    check_inputs(x, pw_weight, dw_weight, pw_bias, dw_bias, gated)
    cont = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return fn(x.contiguous(), pw_weight.contiguous(), dw_weight.contiguous(), cont(pw_bias), cont(dw_bias))


@autocast_entry
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
    return _call(PW_DW.op, False, x, pw_weight, dw_weight, pw_bias, dw_bias)


@autocast_entry
def pointwise_depthwise_conv_gated(x: torch.Tensor, pw_weight: torch.Tensor, dw_weight: torch.Tensor,
                                   pw_bias: Optional[torch.Tensor] = None,
                                   dw_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a, b = split(pointwise_depthwise_conv(...))``; returns ``gelu(a) * b``, (B, C_out/2, H, W)."""
    return _call(PW_DW_GATED.op, True, x, pw_weight, dw_weight, pw_bias, dw_bias)


# the public entry points (moce_kernels.ops exports these names)
__all__ = ["pointwise_depthwise_conv", "pointwise_depthwise_conv_gated"]
