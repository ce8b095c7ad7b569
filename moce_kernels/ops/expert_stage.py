"""The MoCE expert stage: every routed (image, expert) pair in one op, ``moe_experts``.

Rows follow the routing of :mod:`.routing`: slot ``s = b * k + j`` is image b's j-th choice;
``perm`` (B*k,) lists the slots sorted by expert and expert e owns ``perm[offsets[e]:offsets[e+1]]``
and the same rows of the output. The weights are one :class:`ExpertWeights` per expert; the
``torch.library`` op below takes them flattened (the only place they are).
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..expert_stage.weights import PER_EXPERT, ExpertWeights, flatten, unflatten
from ._common import call_impl, check_same, check_tensor, register_autograd
from .routing import check_routing


@torch.library.custom_op("moce::moe_experts", mutates_args=())
def _experts(x: torch.Tensor, shared: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, k: int,
             weights: List[torch.Tensor], windows: List[int], depths: List[int]) -> torch.Tensor:
    return call_impl("moe_experts", x.device, x, shared, perm, offsets, k, unflatten(weights), windows, depths)


@_experts.register_fake
def _(x, shared, perm, offsets, k, weights, windows, depths):
    return x.new_empty((perm.shape[0],) + tuple(x.shape[1:]))


@torch.library.custom_op("moce::moe_experts_backward", mutates_args=())
def _experts_backward(grad: torch.Tensor, x: torch.Tensor, shared: torch.Tensor, perm: torch.Tensor,
                      offsets: torch.Tensor, k: int, weights: List[torch.Tensor], windows: List[int],
                      depths: List[int]) -> List[torch.Tensor]:
    gx, gs, gw = call_impl("moe_experts_backward", x.device, grad, x, shared, perm, offsets, k, unflatten(weights),
                           windows, depths)
    return [gx, gs] + flatten(gw)


@_experts_backward.register_fake
def _(grad, x, shared, perm, offsets, k, weights, windows, depths):
    return [torch.empty_like(x), torch.empty_like(shared)] + [torch.empty_like(w) for w in weights]


def _experts_setup(ctx, inputs, output):
    x, shared, perm, offsets, k, weights, windows, depths = inputs
    ctx.save_for_backward(x, shared, perm, offsets, *weights)
    ctx.args = (k, windows, depths)


def _experts_bwd(ctx, grad):
    x, shared, perm, offsets, *weights = ctx.saved_tensors
    k, windows, depths = ctx.args
    grads = _experts_backward(grad.contiguous(), x, shared, perm, offsets, k, weights, windows, depths)
    return grads[0], grads[1], None, None, None, list(grads[2:]), None, None


register_autograd(_experts, _experts_bwd, _experts_setup)


def check_expert_weights(experts: Sequence[Sequence[torch.Tensor]], C: int) -> List[ExpertWeights]:
    """Each expert's weights as an :class:`ExpertWeights` with the shapes of its rank (that of
    ``proj0``) over C channels; a clear error otherwise."""
    out = []
    for e, w in enumerate(experts):
        if isinstance(w, torch.Tensor) or len(w) != PER_EXPERT:
            got = "a tensor" if isinstance(w, torch.Tensor) else f"{len(w)}"
            raise ValueError(f"expert {e}: expected {PER_EXPERT} weights per expert (an ExpertWeights: "
                             f"{', '.join(ExpertWeights._fields)}), got {got}")
        w = ExpertWeights(*w)
        for name, t in zip(ExpertWeights._fields, w):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"expert {e} weight {name} must be a torch.Tensor, got {type(t).__name__}")
        r, kq, kkv = w.rank, w.q_dw.shape[-1], w.kv_dw.shape[-1]
        for i, (name, t, shape) in enumerate(zip(ExpertWeights._fields, w, ExpertWeights.shapes(C, r, kq, kkv))):
            if tuple(t.shape) != shape:
                raise ValueError(f"expert {e} weight {i} ({name}) has shape {tuple(t.shape)}, expected {shape} "
                                 f"(rank {r}, {C} channels)")
        out.append(w)
    return out


def experts(x: torch.Tensor, shared: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, k: int,
            weights: Sequence[ExpertWeights], windows: Sequence[int], depths: Sequence[int]) -> torch.Tensor:
    """Run every routed (image, expert) pair.

    Expert e (rank r_e, window p_e, depth d_e) applies, d_e times,
    ``x <- x + proj2(window_attention_body(proj0(x)) * silu(proj1(shared)))`` (:class:`ExpertWeights`).

    Args:
        x, shared: (B, C, H, W).  perm, offsets: from ``moe_dispatch``.  k: slots per image.
        weights: one :class:`ExpertWeights` (or sequence of its 13 tensors in field order) per expert.
        windows, depths: per expert.
    Returns:
        (B*k, C, H, W): row r (in expert e's segment) is expert e applied to image ``perm[r] // k``.
    """
    check_tensor("x", x, 4)
    check_tensor("shared", shared, 4)
    if shared.shape != x.shape:
        raise ValueError(f"shared has shape {tuple(shared.shape)} but x has {tuple(x.shape)}")
    E = len(windows)
    if len(depths) != E or len(weights) != E:
        raise ValueError(f"expected {E} experts' weights ({PER_EXPERT} weights per expert, an ExpertWeights each) "
                         f"and one window and depth per expert; got {len(weights)} experts' weights, {len(windows)} "
                         f"windows, {len(depths)} depths")
    ws = check_expert_weights(weights, x.shape[1])
    check_routing(perm, offsets, x.shape[0] * k, E, x.device)
    flat = flatten(ws)
    check_same(("x", "shared") + tuple(f"expert {i // PER_EXPERT} weight {ExpertWeights._fields[i % PER_EXPERT]}"
                                       for i in range(len(flat))), (x, shared, *flat), "dtype")
    return _experts(x.contiguous(), shared.contiguous(), perm, offsets, int(k), [w.contiguous() for w in flat],
                    [int(w) for w in windows], [int(d) for d in depths])
