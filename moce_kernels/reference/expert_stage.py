"""Reference MoCE expert stage (plain PyTorch): every routed (image, expert) pair, expert by expert.

Rows follow :mod:`moce_kernels.ops.expert_stage`: row r of expert e's segment (``offsets[e] <= r <
offsets[e+1]``) is expert e applied to image ``perm[r] // k``. Reads ``offsets`` on the host (the
reference may synchronise).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..backends import register
from ..expert_stage.weights import ExpertWeights
from .grads import conv1x1_grads, pointwise_depthwise_grads, silu_grad
from . import expert_conv as conv
from . import window_attention as wattn


def expert_step(x, shared, w: ExpertWeights, window: int) -> torch.Tensor:
    """One step of a complexity expert: ``x + proj2(body(proj0(x)) * silu(proj1(shared)))``."""
    z = F.conv2d(x, w.proj0)
    q = conv.pointwise_depthwise_conv(z, w.q, w.q_dw, None, w.q_dw_bias)
    k, v = conv.pointwise_depthwise_conv(z, w.kv, w.kv_dw, None, w.kv_dw_bias).chunk(2, dim=1)
    body = F.conv2d(wattn.window_fft_attention(q, k, v, window, w.norm_weight, w.norm_bias), w.proj_out,
                    w.proj_out_bias)
    return F.conv2d(body * F.silu(F.conv2d(shared, w.proj1)), w.proj2) + x


def expert_forward(x, shared, w: ExpertWeights, window: int, depth: int) -> torch.Tensor:
    """An expert of depth d chains its step d times."""
    for _ in range(depth):
        x = expert_step(x, shared, w, window)
    return x


def experts(x, shared, perm, offsets, k: int, weights: Sequence[ExpertWeights], windows: Sequence[int],
            depths: Sequence[int]) -> torch.Tensor:
    """(B*k, C, H, W): row r of expert e's segment is expert e applied to image perm[r] // k."""
    bounds = offsets.tolist()  # host read: the reference backend is allowed to synchronise
    images = torch.div(perm, k, rounding_mode="floor")
    segments = []
    for e, w in enumerate(weights):
        idx = images[bounds[e]:bounds[e + 1]]
        if idx.numel():
            segments.append(expert_forward(x[idx], shared[idx], w, windows[e], depths[e]))
    return torch.cat(segments, dim=0)  # every slot belongs to exactly one expert, in expert order


@register("moe_experts", "reference")
def _experts(x, shared, perm, offsets, k, weights, windows, depths):
    with torch.no_grad():
        return experts(x, shared, perm, offsets, k, weights, windows, depths).contiguous()


def expert_step_backward(g_out, x, shared, w: ExpertWeights, window: int
                         ) -> Tuple[torch.Tensor, torch.Tensor, ExpertWeights]:
    """Closed-form backward of :func:`expert_step`: (grad_x, grad_shared, grad of every weight)."""
    z = F.conv2d(x, w.proj0)
    q = conv.pointwise_depthwise_conv(z, w.q, w.q_dw, None, w.q_dw_bias)
    k, v = conv.pointwise_depthwise_conv(z, w.kv, w.kv_dw, None, w.kv_dw_bias).chunk(2, dim=1)
    a = wattn.window_fft_attention(q, k, v, window, w.norm_weight, w.norm_bias)
    body = F.conv2d(a, w.proj_out, w.proj_out_bias)
    gate_pre = F.conv2d(shared, w.proj1)
    gate = F.silu(gate_pre)
    gy, g_proj2 = conv1x1_grads(g_out, body * gate, w.proj2)
    g_body, g_gate_pre = gy * gate, gy * body * silu_grad(gate_pre)
    g_shared, g_proj1 = conv1x1_grads(g_gate_pre, shared, w.proj1)
    g_a, g_proj_out = conv1x1_grads(g_body, a, w.proj_out)
    g_q, g_k, g_v, g_nw, g_nb = wattn.window_fft_attention_backward(g_a, q, k, v, window, w.norm_weight,
                                                                    w.norm_bias, 1e-5)
    gz_q, g_q1x1, g_q_dw, _, g_q_dw_bias = pointwise_depthwise_grads(g_q, z, w.q, w.q_dw, None)
    gz_kv, g_kv, g_kv_dw, _, g_kv_dw_bias = pointwise_depthwise_grads(torch.cat([g_k, g_v], 1), z, w.kv, w.kv_dw,
                                                                      None)
    gx, g_proj0 = conv1x1_grads(gz_q + gz_kv, x, w.proj0)
    grads = ExpertWeights(proj0=g_proj0, proj1=g_proj1, proj2=g_proj2, q=g_q1x1, q_dw=g_q_dw, q_dw_bias=g_q_dw_bias,
                          kv=g_kv, kv_dw=g_kv_dw, kv_dw_bias=g_kv_dw_bias, norm_weight=g_nw, norm_bias=g_nb,
                          proj_out=g_proj_out, proj_out_bias=g_body.sum((0, 2, 3)))
    return gx + g_out, g_shared, grads


def experts_backward(grad, x, shared, perm, offsets, k: int, weights: Sequence[ExpertWeights],
                     windows: Sequence[int], depths: Sequence[int]
                     ) -> Tuple[torch.Tensor, torch.Tensor, List[ExpertWeights]]:
    """Closed form: (grad_x, grad_shared, grad of every expert's weights) (zeros for idle experts)."""
    gx, gs = torch.zeros_like(x), torch.zeros_like(shared)
    gws = [w.map(torch.zeros_like) for w in weights]
    bounds = offsets.tolist()
    images = torch.div(perm, k, rounding_mode="floor")
    for e, w in enumerate(weights):
        lo, hi = bounds[e], bounds[e + 1]
        if hi == lo:
            continue
        idx = images[lo:hi]
        xs, ss = [x[idx]], shared[idx]
        for _ in range(depths[e] - 1):
            xs.append(expert_step(xs[-1], ss, w, windows[e]))
        g = grad[lo:hi]
        g_s_rows = torch.zeros_like(ss)
        for x_in in reversed(xs):
            g, g_s, g_w = expert_step_backward(g, x_in, ss, w, windows[e])
            g_s_rows += g_s
            for acc, gw in zip(gws[e], g_w):
                acc += gw
        gx.index_add_(0, idx, g)
        gs.index_add_(0, idx, g_s_rows)
    return gx, gs, gws


@register("moe_experts_backward", "reference")
def _experts_backward(grad, x, shared, perm, offsets, k, weights, windows, depths):
    with torch.no_grad():
        gx, gs, gws = experts_backward(grad, x, shared, perm, offsets, k, weights, windows, depths)
    return gx.contiguous(), gs.contiguous(), [w.map(torch.Tensor.contiguous) for w in gws]
