"""The op implementations a backend registers, built from its launchers.

The Triton and CUDA backends implement the same ops the same way around different kernels; these
builders write those implementations once. A backend registers what they return with
:func:`moce_kernels.backends.register_all`.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, Tuple

import torch

from ..outputs import new_output
from . import driver
from .interface import ExpertStageKernels


def conv_and_expert_implementations(kernels: ExpertStageKernels) -> Dict[str, Callable]:
    """``pointwise_depthwise_conv(_gated)(_backward)`` and ``moe_experts(_backward)`` on ``kernels``."""
    impls: Dict[str, Callable] = {}
    for gated in (False, True):
        name = "pointwise_depthwise_conv" + ("_gated" if gated else "")
        impls[name] = functools.partial(driver.pwdw_forward, kernels, gated=gated)
        impls[name + "_backward"] = functools.partial(driver.pwdw_backward, kernels, gated=gated)
    impls["moe_experts"] = functools.partial(driver.experts_forward, kernels)
    impls["moe_experts_backward"] = functools.partial(driver.experts_backward, kernels)
    return impls


def _all_rows(q: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0, q.shape[0]], dtype=torch.int64, device=q.device)


def window_attention_implementations(rows: Callable, rows_backward: Callable) -> Dict[str, Callable]:
    """``window_fft_attention(_backward)`` as the row launchers (signatures of
    :meth:`ExpertStageKernels.attention_rows` / ``attention_rows_backward``) over every row."""

    def forward(q, k, v, window_size, norm_weight, norm_bias, eps) -> torch.Tensor:
        out = new_output(q.shape, q.dtype, q.device)
        rows(q, k, v, window_size, norm_weight, norm_bias, eps, out, _all_rows(q))
        return out

    def backward(grad, q, k, v, window_size, norm_weight, norm_bias, eps) -> Tuple[torch.Tensor, ...]:
        gq, gk, gv = (new_output(t.shape, t.dtype, t.device) for t in (q, k, v))
        gw, gb = rows_backward(grad.contiguous(), q, k, v, window_size, norm_weight, norm_bias, eps, gq, gk, gv,
                               _all_rows(q))
        return gq, gk, gv, gw.to(norm_weight.dtype), gb.to(norm_bias.dtype)

    return {"window_fft_attention": forward, "window_fft_attention_backward": backward}
