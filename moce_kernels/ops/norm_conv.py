"""The trunk's LayerNorm folded into the 1x1 convolution after it, and the 1x1 with a residual epilogue.

``LN`` is the trunk's LayerNorm over the channels of an NCHW tensor, mean and biased variance per
pixel: WithBias ``(x - mean) / sqrt(var + eps) * norm_weight + norm_bias``; ``norm_bias=None`` is
BiasFree, ``x / sqrt(var + eps) * norm_weight`` (x not centred; the variance still around the mean).

- ``layer_norm_pointwise_depthwise_conv(x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias, dw_bias,
  eps)`` = ``pointwise_depthwise_conv(LN(x), pw_weight, dw_weight, pw_bias, dw_bias)`` (MDTA's qkv), and
  its ``_gated`` variant = ``pointwise_depthwise_conv_gated(LN(x), ...)`` (GDFN's input).
- ``layer_norm_pointwise_conv(x, norm_weight, norm_bias, weight, bias, eps, chunks)`` =
  ``conv2d(LN(x), weight, bias).chunk(chunks, dim=1)``, each chunk its own contiguous tensor: the decoder
  block's two projections of one normalised input as one call (``weight``, ``bias``: both projections'
  parameters concatenated), so that x is read once.
- ``pointwise_conv(x, weight, bias, residual)`` = ``conv2d(x, weight, bias) + residual``: a 1x1 projection
  followed by ``+ x`` (MDTA's and GDFN's ``project_out`` in a block), the add in the 1x1's epilogue.

The normalised tensor never reaches memory in the forward; how the Triton kernels do it, and what
each call moves and launches beside the eager path, is in :mod:`moce_kernels.triton.norm_conv`.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._common import FLOAT_DTYPES, check_conv1x1, check_positive, check_same, check_tensor, check_tensors
from ._declare import autocast_entry, declare_simple
from .expert_conv import check_inputs as check_pointwise_depthwise, declare_pointwise_depthwise_op

EPS = 1e-5
TRUNK_ORDER = ("triton", "reference")  # the fused trunk ops: Triton first, by count (see channel_attention)

LN_PW_DW = declare_pointwise_depthwise_op(gated=False, norm=True)
LN_PW_DW_GATED = declare_pointwise_depthwise_op(gated=True, norm=True)
LN_PW = declare_simple(
    "layer_norm_pointwise_conv",
    [("Tensor", "x"), ("Tensor", "norm_weight"), ("Tensor?", "norm_bias"), ("Tensor", "weight"), ("Tensor?", "bias"),
     ("float", "eps"), ("int", "chunks")],
    lambda x, nw, nb, w, b, eps, chunks: (chunks, x.shape[0], w.shape[0] // chunks, x.shape[2], x.shape[3]),
    family="LN+1x1", cuda_order=TRUNK_ORDER)
PW = declare_simple(
    "pointwise_conv", [("Tensor", "x"), ("Tensor", "weight"), ("Tensor?", "bias"), ("Tensor?", "residual")],
    lambda x, w, b, r: (x.shape[0], w.shape[0], x.shape[2], x.shape[3]), passthrough="residual",
    family="1x1", cuda_order=TRUNK_ORDER)


def _contiguous(*ts: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    return tuple([None if t is None else t.contiguous() for t in ts])


def check_norm(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor], eps: float) -> None:
    """The LayerNorm's inputs: (C,) weight, (C,) bias or None, eps a finite number > 0."""
    check_tensors(("x", x, 4, False), ("norm_weight", norm_weight, 1, False), ("norm_bias", norm_bias, 1, True))
    c = x.shape[1]
    for n, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and t.shape[0] != c:
            raise ValueError(f"{n} must have {c} entries (x's channels), got {t.shape[0]}")
    check_positive("eps", eps)
    names, tensors = ("x", "norm_weight", "norm_bias"), (x, norm_weight, norm_bias)
    check_same(names, tensors, "both")


def check_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    residual: Optional[torch.Tensor] = None) -> None:
    """A 1x1 conv's inputs: x (B, C_in, H, W), weight (C_out, C_in, 1, 1), bias (C_out,), residual
    (B, C_out, H, W); one device, one dtype."""
    c_out = check_conv1x1(x, weight, bias)
    if residual is not None:
        check_tensor("residual", residual, 4, FLOAT_DTYPES)
        want = (x.shape[0], c_out, x.shape[2], x.shape[3])
        if residual.shape != want:
            raise ValueError(f"residual must have the output's shape {want}, got {tuple(residual.shape)}")
    names, tensors = ("x", "weight", "bias", "residual"), (x, weight, bias, residual)
    check_same(names, tensors, "both")
    if 0 in x.shape:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")


@autocast_entry
def layer_norm_pointwise_depthwise_conv(x: torch.Tensor, norm_weight: torch.Tensor,
                                        norm_bias: Optional[torch.Tensor], pw_weight: torch.Tensor,
                                        dw_weight: torch.Tensor, pw_bias: Optional[torch.Tensor] = None,
                                        dw_bias: Optional[torch.Tensor] = None, eps: float = EPS) -> torch.Tensor:
    """``dw(pw(LN(x)))``: :func:`~moce_kernels.ops.pointwise_depthwise_conv` of the LayerNorm of x.

    Args:
        x: (B, C_in, H, W).  norm_weight: (C_in,).  norm_bias: (C_in,), or None for BiasFree.
        pw_weight: (C_out, C_in, 1, 1).  dw_weight: (C_out, 1, k, k), k in {3, 5, 7}.
        pw_bias, dw_bias: optional (C_out,).  eps: the LayerNorm's epsilon.
    Returns:
        (B, C_out, H, W) in x's dtype.
    """
    check_norm(x, norm_weight, norm_bias, eps)
    check_pointwise_depthwise(x, pw_weight, dw_weight, pw_bias, dw_bias, gated=False)
    return LN_PW_DW.op(*_contiguous(x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias, dw_bias), float(eps))


@autocast_entry
def layer_norm_pointwise_depthwise_conv_gated(x: torch.Tensor, norm_weight: torch.Tensor,
                                              norm_bias: Optional[torch.Tensor], pw_weight: torch.Tensor,
                                              dw_weight: torch.Tensor, pw_bias: Optional[torch.Tensor] = None,
                                              dw_bias: Optional[torch.Tensor] = None,
                                              eps: float = EPS) -> torch.Tensor:
    """``a, b = split(dw(pw(LN(x))))``; returns ``gelu(a) * b``, (B, C_out/2, H, W) (arguments as
    :func:`layer_norm_pointwise_depthwise_conv`)."""
    check_norm(x, norm_weight, norm_bias, eps)
    check_pointwise_depthwise(x, pw_weight, dw_weight, pw_bias, dw_bias, gated=True)
    return LN_PW_DW_GATED.op(*_contiguous(x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias, dw_bias),
                           float(eps))


@autocast_entry
def layer_norm_pointwise_conv(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: Optional[torch.Tensor],
                              weight: torch.Tensor, bias: Optional[torch.Tensor] = None, eps: float = EPS,
                              chunks: int = 1) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """``conv2d(LN(x), weight, bias)``, split into ``chunks`` equal channel groups.

    Args:
        x: (B, C_in, H, W).  norm_weight: (C_in,).  norm_bias: (C_in,), or None for BiasFree.
        weight: (C_out, C_in, 1, 1).  bias: optional (C_out,).  eps: the LayerNorm's epsilon.
        chunks: number of equal output channel groups (divides C_out); for several projections of one
            normalised input, concatenate their weights (and biases) and pass their number.
    Returns:
        chunks == 1: (B, C_out, H, W).  Otherwise a tuple of ``chunks`` contiguous (B, C_out/chunks, H, W)
        tensors, as ``torch.chunk(conv2d(LN(x), weight, bias), chunks, dim=1)`` (each a view of one
        (chunks, B, C_out/chunks, H, W) result).
    """
    check_norm(x, norm_weight, norm_bias, eps)
    check_pointwise(x, weight, bias)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1 or weight.shape[0] % chunks:
        raise ValueError(f"chunks must be a positive integer dividing C_out = {weight.shape[0]}, got {chunks!r}")
    out = LN_PW.op(*_contiguous(x, norm_weight, norm_bias, weight, bias), float(eps), chunks)
    return out[0] if chunks == 1 else tuple(out.unbind(0))


@autocast_entry
def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(x, weight, bias) + residual`` (1x1; bias and residual optional).

    Args:
        x: (B, C_in, H, W).  weight: (C_out, C_in, 1, 1).  bias: optional (C_out,).
        residual: optional (B, C_out, H, W), added in the 1x1's epilogue.
    Returns:
        (B, C_out, H, W) in x's dtype.
    """
    check_pointwise(x, weight, bias, residual)
    return PW.op(*_contiguous(x, weight, bias, residual))


# the public entry points (moce_kernels.ops exports these names)
__all__ = ["layer_norm_pointwise_depthwise_conv", "layer_norm_pointwise_depthwise_conv_gated",
           "layer_norm_pointwise_conv", "pointwise_conv"]
