"""Reference routing, dispatch and combine for the MoCE layer (plain PyTorch; the expert stage:
:mod:`.expert_stage`).

Conventions shared by every backend (see :mod:`moce_kernels.ops.routing`):
  slot ``s = b * k + j`` is image b's j-th choice; ``perm`` lists slots sorted by expert
  (stable), ``offsets[e]:offsets[e+1]`` is expert e's segment of ``perm`` and of the
  expert-stage output rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backends import register
from .grads import cv_squared_grad


# ---------------------------------------------------------------- router
def router_logits(x, freq_emb, gate_weight, freq_weight) -> torch.Tensor:
    """(B, E) float32 logits: ``Linear(mean_HW(x)) + Linear(freq_emb)``."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    pooled = x.to(cdt).mean(dim=(2, 3))
    return F.linear(pooled, gate_weight.to(cdt)) + F.linear(freq_emb.to(cdt), freq_weight.to(cdt))


def top_k(v: torch.Tensor, k: int):
    """(values, indices) of the k largest entries of each row of v (B, E): NaN ranks above every
    number and ties go to the lower index, the order every backend follows (``torch.topk`` leaves
    ties unspecified, and an image containing NaN makes its whole row NaN)."""
    values, indices = torch.sort(v, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    return (v.std() / (v.mean() + 1e-8)) ** 2


def aux_loss(logits, noisy, complexity, k: int, noise_std: float, use_complexity: bool) -> torch.Tensor:
    """``0.5 * cv2(importance) + 0.5 * cv2(load)`` as in the authors' RoutingFunction."""
    importance = logits.softmax(dim=-1).sum(dim=0)
    if use_complexity:
        importance = importance * complexity.to(importance.dtype)
    threshold = top_k(noisy, k)[0][:, -1:]
    z = (threshold - logits) / noise_std
    load = (1.0 - 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))).mean(dim=0)
    return 0.5 * _cv_squared(importance) + 0.5 * _cv_squared(load)


def route(x, freq_emb, gate_weight, freq_weight, complexity, noise, k: int, noise_std: float,
          compute_loss: bool, use_complexity: bool):
    """Returns gates (B, k), indices (B, k) int64, logits (B, E), loss () (0 unless compute_loss)."""
    logits = router_logits(x, freq_emb, gate_weight, freq_weight)
    noisy = logits + noise.to(logits.dtype)
    gates, indices = top_k(noisy.softmax(dim=-1), k)
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


def route_backward(grad_gates, grad_logits, grad_loss, x, freq_emb, gate_weight, freq_weight, complexity, noise,
                   k: int, noise_std: float, compute_loss: bool, use_complexity: bool):
    """Closed form: (grad_x, grad_freq_emb, grad_gate_weight, grad_freq_weight)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, C, H, W = x.shape
    pooled = x.to(cdt).mean(dim=(2, 3))
    logits = router_logits(x, freq_emb, gate_weight, freq_weight)
    noisy = logits + noise.to(cdt)
    scores = noisy.softmax(-1)
    idx = top_k(scores, k)[1]
    # gates = top-k of softmax(noisy): softmax backward of the scattered gate grads
    g_scores = torch.zeros_like(scores).scatter_(1, idx, grad_gates.to(cdt))
    g_noisy = scores * (g_scores - (g_scores * scores).sum(-1, keepdim=True))
    g_logits = grad_logits.to(cdt) + g_noisy
    if compute_loss:
        gl = grad_loss.to(cdt)
        probs = logits.softmax(-1)
        cx = complexity.to(cdt) if use_complexity else torch.ones_like(complexity, dtype=cdt)
        g_imp = 0.5 * gl * cv_squared_grad(probs.sum(0) * cx) * cx  # d/d probs[b, e], same for every b
        g_logits = g_logits + probs * (g_imp - (g_imp * probs).sum(-1, keepdim=True))
        kth = top_k(noisy, k)[1][:, -1:]
        z = (noisy.gather(1, kth) - logits) / noise_std
        load = (1.0 - 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))).mean(0)
        g_p = 0.5 * gl * cv_squared_grad(load) / B  # d/d p[b, e]
        g_z = -g_p * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        g_logits = g_logits - g_z / noise_std
        g_logits = g_logits.scatter_add(1, kth, (g_z / noise_std).sum(-1, keepdim=True))
    g_pooled = g_logits @ gate_weight.to(cdt)
    gx = (g_pooled / (H * W))[:, :, None, None].expand(B, C, H, W)
    return (gx.to(x.dtype), (g_logits @ freq_weight.to(cdt)).to(freq_emb.dtype),
            (g_logits.T @ pooled).to(gate_weight.dtype), (g_logits.T @ freq_emb.to(cdt)).to(freq_weight.dtype))


@register("moe_route_backward", "reference")
def _route_backward(grad_gates, grad_logits, grad_loss, x, freq_emb, gate_weight, freq_weight, complexity, noise,
                    k, noise_std, compute_loss, use_complexity):
    with torch.no_grad():
        grads = route_backward(grad_gates, grad_logits, grad_loss, x, freq_emb, gate_weight, freq_weight,
                               complexity, noise, k, noise_std, compute_loss, use_complexity)
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


# ---------------------------------------------------------------- combine
def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    """inv[perm[i]] = i (out of place, so it traces as a functional graph). Starts from zeros, not empty:
    an invalid perm reads row 0, never past the buffer."""
    return torch.zeros_like(perm).scatter(0, perm, torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype))


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


def combine_backward(grad, expert_out, gates, perm):
    """Closed form: grad_expert_out[pos(b,j)] = gates[b,j] * grad[b]; grad_gates[b,j] = <grad[b], row>."""
    B, k = gates.shape
    cdt = torch.float64 if expert_out.dtype == torch.float64 else torch.float32
    images = torch.div(perm, k, rounding_mode="floor")
    g_rows = grad.to(cdt)[images]
    slot_gates = gates.to(cdt).reshape(-1)[perm]
    g_eo = g_rows * slot_gates[:, None, None, None]
    g_slot = (g_rows * expert_out.to(cdt)).sum((1, 2, 3))
    g_gates = torch.zeros(B * k, dtype=cdt, device=gates.device).index_copy_(0, perm, g_slot).view(B, k)
    return g_eo.to(expert_out.dtype), g_gates.to(gates.dtype)


@register("moe_combine_backward", "reference")
def _combine_backward(grad, expert_out, gates, perm):
    with torch.no_grad():
        g_eo, g_gates = combine_backward(grad, expert_out, gates, perm)
    return g_eo.contiguous(), g_gates.contiguous()
