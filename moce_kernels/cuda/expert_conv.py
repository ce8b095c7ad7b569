"""Backend ``cuda`` for the fused pointwise -> depthwise convolutions (csrc/expert_conv).

The launch wrappers here have the signatures of the Triton launchers in
:mod:`moce_kernels.triton.expert_conv`, so the backend-agnostic driver
(:mod:`moce_kernels.ops.grouped_conv`) runs the same orchestration on either backend. float64
inputs are delegated to the reference (the CUDA kernels take float32, float16 and bfloat16).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import extension  # noqa: F401  (registers torch.ops.moce_C)

from ..backends import register
from ..ops import grouped_conv as driver
from ..reference import expert_conv as ref

_ops = torch.ops.moce_C


def launch_pwdw(src: torch.Tensor, w: torch.Tensor, dw: torch.Tensor, pb: Optional[torch.Tensor],
                db: Optional[torch.Tensor], out: torch.Tensor, offsets: torch.Tensor, meta: torch.Tensor,
                N: int, H: int, W: int, K: int, max_nch: int, mode: int = 0,
                perm: Optional[torch.Tensor] = None, kslots: int = 1,
                g: Optional[torch.Tensor] = None, gofull: Optional[torch.Tensor] = None) -> None:
    _ops.grouped_pwdw(src, w, dw, pb, db, out, offsets, meta, perm, kslots, N, H, W, K, max_nch, mode, g,
                      gofull if gofull is not None else out)


def launch_pwdw_bwd(src, w, dw, pb, go, gy, gdw, gdb, offsets, meta, N: int, H: int, W: int, K: int, max_cout: int,
                    perm: Optional[torch.Tensor] = None, kslots: int = 1) -> None:
    _ops.grouped_pwdw_backward(src, w, dw, pb, go, gy, gdw, gdb if gdb is not None else gdw, gdb is not None,
                               offsets, meta, perm, kslots, N, H, W, K, max_cout)


def launch_gemm(x, w, b, y, offsets, meta, N: int, HW: int, max_cout: int, perm: Optional[torch.Tensor] = None,
                kslots: int = 1, accumulate: bool = False) -> None:
    _ops.grouped_gemm(x, w, b, y, offsets, meta, perm, kslots, N, HW, max_cout, accumulate)


def launch_wgrad(g, x, o, bo, offsets, meta, HW: int, max_cout: int, max_cin: int, N: int,
                 perm: Optional[torch.Tensor] = None, kslots: int = 1) -> None:
    n_split = max(1, min(N * ((HW + 31) // 32), 128))
    _ops.grouped_wgrad(g, x, o, bo if bo is not None else o, bo is not None, offsets, meta, perm, kslots, HW,
                       max_cout, max_cin, n_split)


CONV_KERNELS = driver.Kernels(pwdw=launch_pwdw, pwdw_bwd=launch_pwdw_bwd, gemm=launch_gemm, wgrad=launch_wgrad)


@register("pointwise_depthwise_conv", "cuda")
def _fwd(x, pw_weight, dw_weight, pw_bias, dw_bias):
    if x.dtype == torch.float64:
        return ref._fwd(x, pw_weight, dw_weight, pw_bias, dw_bias)
    return driver.pwdw_forward(CONV_KERNELS, x, pw_weight, dw_weight, pw_bias, dw_bias, gated=False)


@register("pointwise_depthwise_conv_gated", "cuda")
def _fwd_gated(x, pw_weight, dw_weight, pw_bias, dw_bias):
    if x.dtype == torch.float64:
        return ref._fwd_gated(x, pw_weight, dw_weight, pw_bias, dw_bias)
    return driver.pwdw_forward(CONV_KERNELS, x, pw_weight, dw_weight, pw_bias, dw_bias, gated=True)


@register("pointwise_depthwise_conv_backward", "cuda")
def _bwd(grad, x, pw_weight, dw_weight, pw_bias, dw_bias):
    if x.dtype == torch.float64:
        return ref._bwd(grad, x, pw_weight, dw_weight, pw_bias, dw_bias)
    return driver.pwdw_backward(CONV_KERNELS, grad, x, pw_weight, dw_weight, pw_bias, dw_bias, gated=False)


@register("pointwise_depthwise_conv_gated_backward", "cuda")
def _bwd_gated(grad, x, pw_weight, dw_weight, pw_bias, dw_bias):
    if x.dtype == torch.float64:
        return ref._bwd_gated(grad, x, pw_weight, dw_weight, pw_bias, dw_bias)
    return driver.pwdw_backward(CONV_KERNELS, grad, x, pw_weight, dw_weight, pw_bias, dw_bias, gated=True)
