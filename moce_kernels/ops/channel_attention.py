"""Channel ("transposed") attention with its output projection and residual: MDTA and CrossAttention.

``channel_attention(q, k, v, temperature, proj_weight, proj_bias, residual)`` equals, per image b
and head h (c = C / heads channels, N = H * W pixels, q_h, k_h, v_h the head's (c, N) rows)::

    q^ = q_h / max(|q_h|, eps)      k^ = k_h / max(|k_h|, eps)      (row norms over the N pixels)
    A_h = softmax(q^ k^^T * temperature[h])                        (c x c, softmax over the last axis)
    y = blockdiag_h(A_h) v                                          (C x N)
    out = conv1x1(y, proj_weight) + proj_bias + residual            (C_out x N)

i.e. MDTA's transposed attention followed by ``project_out`` (and the block's residual add).
The fast backends compute it in two passes over the activations (DESIGN.md, "Channel attention in
two passes"): the Gram matrix and row norms of q and k in one pass, then
``out[b] = (W_o blockdiag(A_b)) v[b] + bias + residual[b]`` as one per-image 1x1 GEMM.

Stride contract: q, k, v and residual may be views with arbitrary batch and channel strides as long
as every (H, W) plane is contiguous (element (b, c, y, x) at ``b * stride(0) + c * stride(1) + y * W
+ x``), e.g. ``qkv.chunk(3, dim=1)`` of a contiguous (B, 3C, H, W) tensor; such views reach the
kernels without a copy. Other layouts are copied to contiguous first.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import FLOAT_DTYPES, check_conv1x1, check_positive, check_same, check_tensor, check_tensors
from ._declare import Backward, autocast_entry, declare

OP = "channel_attention"
DEFAULT_EPS = 1e-12  # F.normalize's default, as in the model


def _fake(q, k, v, temperature, proj_weight, proj_bias, residual, eps):
    B, _, H, W = q.shape
    return q.new_empty(B, proj_weight.shape[0], H, W)


def _backward_fake(grad, q, k, v, temperature, proj_weight, eps):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), temperature.new_empty(temperature.shape),
            proj_weight.new_empty(proj_weight.shape), proj_weight.new_empty(proj_weight.shape[0]))


def _setup(ctx, inputs, output):
    q, k, v, temperature, proj_weight, proj_bias, residual, eps = inputs
    ctx.save_for_backward(q, k, v, temperature, proj_weight)
    ctx.has_bias, ctx.has_residual, ctx.eps = proj_bias is not None, residual is not None, eps


def _backward(ctx, grad):
    """(grad_q, grad_k, grad_v, grad_temperature, grad_proj_weight, grad_proj_bias) from the backward op;
    the residual's gradient is ``grad`` itself and never reaches a backend."""
    q, k, v, temperature, proj_weight = ctx.saved_tensors
    gq, gk, gv, gt, gw, gb = DECLARATION.backward.op(grad.contiguous(), q, k, v, temperature, proj_weight, ctx.eps)
    return (gq, gk, gv, gt, gw, gb if ctx.has_bias else None, grad if ctx.has_residual else None, None)


def planes_contiguous(t: torch.Tensor) -> bool:
    """True when every (H, W) plane of the 4-D tensor ``t`` is contiguous (the kernels' stride contract)."""
    H, W = t.shape[2], t.shape[3]
    return (t.stride(3) == 1 or W == 1) and (t.stride(2) == W or H == 1)


def _planes(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` itself when it meets the stride contract, else a contiguous copy."""
    return t if t is None or planes_contiguous(t) else t.contiguous()


def _heads(temperature: torch.Tensor) -> int:
    if not isinstance(temperature, torch.Tensor):
        raise TypeError(f"temperature must be a torch.Tensor, got {type(temperature).__name__}")
    shape = tuple(temperature.shape)
    if len(shape) not in (1, 3) or shape[1:] not in ((), (1, 1)) or shape[0] < 1:
        raise ValueError(f"temperature must have shape (heads,) or (heads, 1, 1) with heads >= 1, got {shape}")
    return shape[0]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                 proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                 eps: float) -> None:
    """Raise a clear error for any input the op does not accept."""
    check_tensors(("q", q, 4, False), ("k", k, 4, False), ("v", v, 4, False))
    for n, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{n} has shape {tuple(t.shape)} but q has shape {tuple(q.shape)}; they must match")
    B, C, H, W = q.shape
    heads = _heads(temperature)
    check_tensor("temperature", temperature, temperature.dim(), FLOAT_DTYPES)
    if C % heads:
        raise ValueError(f"heads = {heads} (from temperature's shape) must divide the {C} channels of q")
    c_out = check_conv1x1(q, proj_weight, proj_bias, ("proj_weight", "proj_bias"))
    if residual is not None:
        check_tensor("residual", residual, 4, FLOAT_DTYPES)
        if tuple(residual.shape) != (B, c_out, H, W):
            raise ValueError(f"residual must have shape {(B, c_out, H, W)}, got {tuple(residual.shape)}")
    names = ("q", "k", "v", "temperature", "proj_weight", "proj_bias", "residual")
    tensors = (q, k, v, temperature, proj_weight, proj_bias, residual)
    check_same(names, tensors, "both")
    check_positive("eps", eps)
    if 0 in q.shape or c_out == 0:
        raise ValueError(f"q is empty (shape {tuple(q.shape)}) or C_out = 0; B, C, H, W, C_out must all be >= 1")


DECLARATION = declare(
    OP, "(Tensor q, Tensor k, Tensor v, Tensor temperature, Tensor proj_weight, Tensor? proj_bias, Tensor? residual, "
        "float eps) -> Tensor",
    family="channel attention", fake=_fake, check=check_inputs,
    backward=Backward("(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor temperature, Tensor proj_weight, float eps) "
                      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", _backward_fake, _setup, _backward),
    # the fused trunk ops are not timed yet: Triton first, by count (a MoCE-IR forward at 256 px: 317 ops moving
    # 5.4 GB by the analytic model, against 1,773 ops and 21.3 GB for the eager ops they replace)
    cuda_order=("triton", "reference"))
_op = DECLARATION.op


@autocast_entry
def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                      proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor] = None,
                      residual: Optional[torch.Tensor] = None, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Fused channel attention, output projection and residual (see the module docstring).

    Args:
        q, k, v: (B, C, H, W), one floating dtype; C = heads * c. Views whose (H, W) planes are
            contiguous (e.g. channel chunks of one packed tensor) are used in place.
        temperature: (heads,) or (heads, 1, 1); heads is read from its shape.
        proj_weight: (C_out, C, 1, 1), the output 1x1 conv.  proj_bias: optional (C_out,).
        residual: optional (B, C_out, H, W), added to the output (same stride contract as q).
        eps: clamp of the row norms (F.normalize's eps), > 0.
    Returns:
        (B, C_out, H, W), contiguous, in q's dtype (16-bit inputs accumulate in float32).
    """
    check_inputs(q, k, v, temperature, proj_weight, proj_bias, residual, eps)
    heads = temperature.shape[0]
    bias = None if proj_bias is None else proj_bias.contiguous()
    return _op(_planes(q), _planes(k), _planes(v), temperature.reshape(heads).contiguous(), proj_weight.contiguous(),
               bias, _planes(residual), float(eps))


# the public entry points (moce_kernels.ops exports these names)
__all__ = ["channel_attention"]
