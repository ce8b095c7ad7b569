"""Backend ``cuda`` of the MoCE expert stage (``moe_experts`` and its backward), sync-free.

Same driver as the Triton backend (:mod:`moce_kernels.ops.grouped_conv`) with the CUDA kernels of
csrc/expert_conv; the window attention of each expert's segment is the window-attention family's
``window_attention_rows`` (moce_kernels/cuda/window_attention.py), one launch per expert. float64
inputs are delegated to the reference.
"""
from __future__ import annotations

import torch

from . import extension  # noqa: F401  (registers torch.ops.moce_C)

from ..backends import register
from ..ops import grouped_conv as driver
from ..reference import routing as ref
from . import expert_conv as xc

_ops = torch.ops.moce_C


def launch_final_fwd(xs, shared, attn, w, out, offsets, meta, perm, kslots: int, N: int, C: int, HW: int,
                     x_gather: bool, max_r: int) -> None:
    _ops.expert_epilogue(xs, shared, attn, w, out, offsets, meta, perm, kslots, N, C, HW, x_gather, max_r)


def launch_final_bwd(g, shared, attn, w, gt, gu, h, offsets, meta, perm, kslots: int, N: int, C: int, HW: int,
                     max_r: int) -> None:
    _ops.expert_epilogue_backward(g, shared, attn, w, gt, gu, h, offsets, meta, perm, kslots, N, C, HW, max_r)


def launch_gather_sum(src: torch.Tensor, inv: torch.Tensor, out: torch.Tensor, kslots: int) -> None:
    _ops.gather_sum(src.to(torch.float32).contiguous(), inv, out, kslots)


def _attention_api():
    """The window-attention family's sync-free per-segment CUDA kernels (float64 never reaches here)."""
    from .window_attention import window_attention_rows, window_attention_rows_backward
    return window_attention_rows, window_attention_rows_backward


KERNELS = driver.Kernels(
    pwdw=xc.launch_pwdw, pwdw_bwd=xc.launch_pwdw_bwd, gemm=xc.launch_gemm, wgrad=xc.launch_wgrad,
    final_fwd=launch_final_fwd, final_bwd=launch_final_bwd, gather_sum=launch_gather_sum, attention=_attention_api)


@register("moe_experts", "cuda")
def _experts(x, shared, perm, offsets, k, weights, windows, depths):
    if x.dtype == torch.float64:
        return ref._experts(x, shared, perm, offsets, k, weights, windows, depths)
    return driver.experts_forward(KERNELS, x, shared, perm, offsets, k, weights, windows, depths)


@register("moe_experts_backward", "cuda")
def _experts_backward(grad, x, shared, perm, offsets, k, weights, windows, depths):
    if x.dtype == torch.float64:
        return ref._experts_backward(grad, x, shared, perm, offsets, k, weights, windows, depths)
    return driver.experts_backward(KERNELS, grad, x, shared, perm, offsets, k, weights, windows, depths)
