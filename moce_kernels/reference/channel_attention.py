"""Reference channel attention (the model's eager formula), forward and closed-form backward."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..backends import register
from .grads import conv1x1_grads

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_view(t: Tensor, heads: int, cdt: torch.dtype) -> Tensor:
    """(B, C, H, W) -> (B, heads, C / heads, H * W) in dtype ``cdt`` (a view where t allows)."""
    B, C, H, W = t.shape
    return t.to(cdt).reshape(B, heads, C // heads, H * W)


def channel_attention(q: Tensor, k: Tensor, v: Tensor, temperature: Tensor, proj_weight: Tensor,
                      proj_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                      eps: float = 1e-12) -> Tensor:
    """Differentiable reference, literally the model's ops: ``F.normalize`` of q and k over H*W,
    ``softmax(q k^T * t) @ v`` per head, ``conv2d`` with proj_weight/proj_bias, ``+ residual``.
    temperature: (heads,) or (heads, 1, 1). Computes in float32 (float64 for float64 inputs)."""
    cdt = _compute_dtype(q.dtype)
    heads = temperature.shape[0]
    qh = F.normalize(_heads_view(q, heads, cdt), dim=-1, eps=eps)
    kh = F.normalize(_heads_view(k, heads, cdt), dim=-1, eps=eps)
    attn = (qh @ kh.transpose(-2, -1)) * temperature.to(cdt).reshape(heads, 1, 1)
    y = (attn.softmax(dim=-1) @ _heads_view(v, heads, cdt)).reshape(q.shape)
    out = F.conv2d(y, proj_weight.to(cdt), None if proj_bias is None else proj_bias.to(cdt))
    if residual is not None:
        out = out + residual.to(cdt)
    return out.to(q.dtype)


@register("channel_attention", "reference")
def _forward(q, k, v, temperature, proj_weight, proj_bias, residual, eps):
    with torch.no_grad():
        return channel_attention(q, k, v, temperature, proj_weight, proj_bias, residual, eps).contiguous()


def channel_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, temperature: Tensor,
                               proj_weight: Tensor, eps: float = 1e-12) -> Tuple[Tensor, ...]:
    """Closed form: (grad_q, grad_k, grad_v, grad_temperature, grad_proj_weight, grad_proj_bias) in the
    inputs' dtypes (the residual's gradient is ``grad``).

    Per head, with n_i = |q_i|, r_i = 1 / max(n_i, eps) (likewise s_j for k), Gh = diag(r) q k^T diag(s),
    A = softmax(t Gh), y = A v, out = W y + b:
        gy = W^T g;  grad_W = sum_b g y^T;  grad_b = sum g;  grad_v = A^T gy;  gA = gy v^T
        dS = A * (gA - rowsum(gA * A));  grad_t = sum dS * Gh;  D = t dS * r s^T;  E = t dS * Gh
        grad_q = D k - [n >= eps] r^2 rowsum(E) q;   grad_k = D^T q - [m >= eps] s^2 colsum(E) k
    """
    cdt = _compute_dtype(q.dtype)
    heads = temperature.shape[0]
    B, C, H, W = q.shape
    qh, kh, vh = (_heads_view(t, heads, cdt) for t in (q, k, v))
    t = temperature.to(cdt).reshape(heads, 1, 1)
    nq, nk = qh.norm(dim=-1, keepdim=True), kh.norm(dim=-1, keepdim=True)
    r, s = 1.0 / nq.clamp_min(eps), 1.0 / nk.clamp_min(eps)
    gh = (qh @ kh.transpose(-2, -1)) * r * s.transpose(-2, -1)
    attn = torch.softmax(gh * t, dim=-1)
    y = (attn @ vh).reshape(B, C, H, W)
    g = grad.to(cdt)
    gy, gw = conv1x1_grads(g, y, proj_weight.to(cdt))
    gy = _heads_view(gy, heads, cdt)
    gv = attn.transpose(-2, -1) @ gy
    ga = gy @ vh.transpose(-2, -1)
    ds = attn * (ga - (ga * attn).sum(-1, keepdim=True))
    gt = (ds * gh).sum((0, 2, 3))
    d = t * ds * r * s.transpose(-2, -1)
    e = t * ds * gh
    aq = -(r * r) * (nq >= eps).to(cdt) * e.sum(-1, keepdim=True)
    ak = -(s * s) * (nk >= eps).to(cdt) * e.sum(-2).unsqueeze(-1)
    gq = d @ kh + aq * qh
    gk = d.transpose(-2, -1) @ qh + ak * kh
    shape = (B, C, H, W)
    return (gq.reshape(shape).to(q.dtype), gk.reshape(shape).to(k.dtype), gv.reshape(shape).to(v.dtype),
            gt.reshape(temperature.shape).to(temperature.dtype), gw.to(proj_weight.dtype),
            g.sum((0, 2, 3)).to(proj_weight.dtype))


@register("channel_attention_backward", "reference")
def _backward(grad, q, k, v, temperature, proj_weight, eps) -> Tuple[Tensor, ...]:
    with torch.no_grad():
        grads = channel_attention_backward(grad, q, k, v, temperature, proj_weight, eps)
    return tuple(x.contiguous() for x in grads)
