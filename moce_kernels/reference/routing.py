"""Reference routing, dispatch, expert stage and combine for the MoCE layer (plain PyTorch).

Conventions shared by every backend (see :mod:`moce_kernels.ops.routing`):
  slot ``s = b * k + j`` is image b's j-th choice; ``perm`` lists slots sorted by expert
  (stable), ``offsets[e]:offsets[e+1]`` is expert e's segment of ``perm`` and of the
  expert-stage output rows.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..backends import register
from ._vjp import vjp
from . import expert_conv as conv
from . import window_attention as wattn

WEIGHTS_PER_EXPERT = 13


# ---------------------------------------------------------------- router
def router_logits(x, freq_emb, gate_weight, freq_weight) -> torch.Tensor:
    """(B, E) float32 logits: ``Linear(mean_HW(x)) + Linear(freq_emb)``."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    pooled = x.to(cdt).mean(dim=(2, 3))
    return F.linear(pooled, gate_weight.to(cdt)) + F.linear(freq_emb.to(cdt), freq_weight.to(cdt))


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    return (v.std() / (v.mean() + 1e-8)) ** 2


def aux_loss(logits, noisy, complexity, k: int, noise_std: float, use_complexity: bool) -> torch.Tensor:
    """``0.5 * cv2(importance) + 0.5 * cv2(load)`` as in the authors' RoutingFunction."""
    importance = logits.softmax(dim=-1).sum(dim=0)
    if use_complexity:
        importance = importance * complexity.to(importance.dtype)
    threshold = noisy.topk(k, dim=-1).values[:, -1:]
    z = (threshold - logits) / noise_std
    load = (1.0 - 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))).mean(dim=0)
    return 0.5 * _cv_squared(importance) + 0.5 * _cv_squared(load)


def route(x, freq_emb, gate_weight, freq_weight, complexity, noise, k: int, noise_std: float,
          compute_loss: bool, use_complexity: bool):
    """Returns gates (B, k), indices (B, k) int64, logits (B, E), loss () (0 unless compute_loss)."""
    logits = router_logits(x, freq_emb, gate_weight, freq_weight)
    noisy = logits + noise.to(logits.dtype)
    gates, indices = noisy.softmax(dim=-1).topk(k, dim=-1)
    if compute_loss:
        loss = aux_loss(logits, noisy, complexity, k, noise_std, use_complexity)
    else:
        loss = logits.new_zeros(())
    return gates, indices, logits, loss


@register("moe_route", "reference")
def _route(x, freq_emb, gate_weight, freq_weight, complexity, noise, k, noise_std, compute_loss, use_complexity):
    with torch.no_grad():
        out = route(x, freq_emb, gate_weight, freq_weight, complexity, noise, k, noise_std, compute_loss,
                    use_complexity)
    return tuple(t.contiguous() for t in out)


@register("moe_route_backward", "reference")
def _route_backward(grad_gates, grad_logits, grad_loss, x, freq_emb, gate_weight, freq_weight, complexity, noise,
                    k, noise_std, compute_loss, use_complexity):
    def f(x_, f_, gw_, fw_):
        gates, _, logits, loss = route(x_, f_, gw_, fw_, complexity, noise, k, noise_std, compute_loss,
                                       use_complexity)
        return gates, logits, loss

    grads = vjp(f, (grad_gates, grad_logits, grad_loss), x, freq_emb, gate_weight, freq_weight)
    return tuple(g.contiguous() for g in grads)


# ---------------------------------------------------------------- dispatch
def dispatch(indices: torch.Tensor, num_experts: int):
    """counts (E,), offsets (E+1,), perm (B*k,) all int64; perm = slots sorted by expert, stable."""
    flat = indices.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = counts.cumsum(0)
    perm = torch.sort(flat, stable=True).indices
    return counts.to(torch.int64), offsets, perm.to(torch.int64)


@register("moe_dispatch", "reference")
def _dispatch(indices, num_experts):
    return dispatch(indices, num_experts)


# ---------------------------------------------------------------- experts
def expert_weights(weights: Sequence[torch.Tensor], e: int) -> Sequence[torch.Tensor]:
    return weights[e * WEIGHTS_PER_EXPERT:(e + 1) * WEIGHTS_PER_EXPERT]


def expert_step(x, shared, w: Sequence[torch.Tensor], window: int) -> torch.Tensor:
    """One step of complexity expert: ``x + pw_2(body(pw_0(x)) * silu(pw_1(shared)))``.

    ``w`` = [proj0, proj1, proj2, q, q_dw, q_dw_b, kv, kv_dw, kv_dw_b, norm_w, norm_b, out_w, out_b].
    """
    proj0, proj1, proj2, qw, qdw, qdb, kvw, kvdw, kvdb, nw, nb, ow, ob = w
    z = F.conv2d(x, proj0)
    q = conv.pointwise_depthwise_conv(z, qw, qdw, None, qdb)
    k, v = conv.pointwise_depthwise_conv(z, kvw, kvdw, None, kvdb).chunk(2, dim=1)
    body = F.conv2d(wattn.window_fft_attention(q, k, v, window, nw, nb), ow, ob)
    return F.conv2d(body * F.silu(F.conv2d(shared, proj1)), proj2) + x


def expert_forward(x, shared, w, window: int, depth: int) -> torch.Tensor:
    """An expert of depth d chains its step d times."""
    for _ in range(depth):
        x = expert_step(x, shared, w, window)
    return x


def experts(x, shared, perm, offsets, k: int, weights, windows: Sequence[int], depths: Sequence[int]):
    """(B*k, C, H, W): row r of expert e's segment is expert e applied to image perm[r] // k."""
    out = x.new_empty((perm.numel(),) + tuple(x.shape[1:]))
    bounds = offsets.tolist()  # host read: the reference backend is allowed to synchronise
    images = torch.div(perm, k, rounding_mode="floor")
    rows = []
    for e in range(len(windows)):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            idx = images[lo:hi]
            rows.append((lo, hi, expert_forward(x[idx], shared[idx], expert_weights(weights, e), windows[e],
                                                depths[e])))
    if not rows:
        return out
    return torch.cat([r[2] for r in sorted(rows, key=lambda r: r[0])], dim=0) if len(rows) > 1 else rows[0][2]


@register("moe_experts", "reference")
def _experts(x, shared, perm, offsets, k, weights, windows, depths):
    with torch.no_grad():
        return experts(x, shared, perm, offsets, k, weights, windows, depths).contiguous()


@register("moe_experts_backward", "reference")
def _experts_backward(grad, x, shared, perm, offsets, k, weights, windows, depths) -> List[torch.Tensor]:
    fn = lambda x_, s_, *w_: experts(x_, s_, perm, offsets, k, w_, windows, depths)  # noqa: E731
    return [g.contiguous() for g in vjp(fn, grad, x, shared, *weights)]


# ---------------------------------------------------------------- combine
def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def combine(expert_out, gates, perm) -> torch.Tensor:
    """out[b] = sum_j gates[b, j] * expert_out[pos(b*k + j)], summed in j order."""
    B, k = gates.shape
    cdt = torch.float64 if expert_out.dtype == torch.float64 else torch.float32
    rows = expert_out[inverse_perm(perm)].to(cdt).view((B, k) + tuple(expert_out.shape[1:]))
    g = gates.to(cdt)
    out = g[:, 0, None, None, None] * rows[:, 0]
    for j in range(1, k):
        out = out + g[:, j, None, None, None] * rows[:, j]
    return out.to(expert_out.dtype)


@register("moe_combine", "reference")
def _combine(expert_out, gates, perm):
    with torch.no_grad():
        return combine(expert_out, gates, perm).contiguous()


@register("moe_combine_backward", "reference")
def _combine_backward(grad, expert_out, gates, perm):
    g_eo, g_gates = vjp(lambda e_, g_: combine(e_, g_, perm), grad, expert_out, gates)
    return g_eo.contiguous(), g_gates.contiguous()
