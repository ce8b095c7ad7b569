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
from .. import backends
from ._common import check_same, check_tensor
from ._declare import Backward, autocast_entry, declare
from .routing import check_routing


def _run(x, shared, perm, offsets, k, weights, windows, depths):
    """The op's kernel: the implementations take the weights as one :class:`ExpertWeights` per expert."""
    return DISPATCH(x, shared, perm, offsets, k, unflatten(weights), windows, depths)


def _run_backward(grad, x, shared, perm, offsets, k, weights, windows, depths):
    gx, gs, gw = BACKWARD_DISPATCH(grad, x, shared, perm, offsets, k, unflatten(weights), windows, depths)
    return [gx, gs] + flatten(gw)


def _fake(x, shared, perm, offsets, k, weights, windows, depths):
    return x.new_empty((perm.shape[0],) + tuple(x.shape[1:]))


def _backward_fake(grad, x, shared, perm, offsets, k, weights, windows, depths):
    return [torch.empty_like(x), torch.empty_like(shared)] + [torch.empty_like(w) for w in weights]


def _experts_setup(ctx, inputs, output):
    x, shared, perm, offsets, k, weights, windows, depths = inputs
    ctx.save_for_backward(x, shared, perm, offsets, *weights)
    ctx.args = (k, windows, depths)


def _experts_bwd(ctx, grad):
    x, shared, perm, offsets, *weights = ctx.saved_tensors
    k, windows, depths = ctx.args
    grads = DECLARATION.backward.op(grad.contiguous(), x, shared, perm, offsets, k, weights, windows, depths)
    return grads[0], grads[1], None, None, None, list(grads[2:]), None, None


def _expert_error(e: int, w, C: int) -> Exception:
    """The clear error for expert ``e``'s weights ``w`` that :func:`check_expert_weights` refused."""
    if isinstance(w, torch.Tensor) or len(w) != PER_EXPERT:
        got = "a tensor" if isinstance(w, torch.Tensor) else f"{len(w)}"
        return ValueError(f"expert {e}: expected {PER_EXPERT} weights per expert (an ExpertWeights: "
                          f"{', '.join(ExpertWeights._fields)}), got {got}")
    for name, t in zip(ExpertWeights._fields, w):
        if not isinstance(t, torch.Tensor):
            return TypeError(f"expert {e} weight {name} must be a torch.Tensor, got {type(t).__name__}")
    w = ExpertWeights(*w)
    r, kq, kkv = w.rank, w.q_dw.shape[-1], w.kv_dw.shape[-1]
    for i, (name, t, shape) in enumerate(zip(ExpertWeights._fields, w, ExpertWeights.shapes(C, r, kq, kkv))):
        if tuple(t.shape) != shape:
            return ValueError(f"expert {e} weight {i} ({name}) has shape {tuple(t.shape)}, expected {shape} "
                              f"(rank {r}, {C} channels)")
    return ValueError(f"expert {e}: invalid weights")  # pragma: no cover - the checks above cover each refusal


def _shapes_match(w: ExpertWeights, C: int) -> bool:
    """Attribute reads only: every field of ``w`` has the shape of its rank (that of ``proj0``) over C."""
    try:
        r, kq, kkv = w.proj0.shape[0], w.q_dw.shape[-1], w.kv_dw.shape[-1]
        for t, shape in zip(w, ExpertWeights.shapes(C, r, kq, kkv)):
            if t.shape != shape:
                return False
        return True
    except AttributeError:
        return False


def check_expert_weights(experts: Sequence[Sequence[torch.Tensor]], C: int) -> List[ExpertWeights]:
    """Each expert's weights as an :class:`ExpertWeights` with the shapes of its rank (that of
    ``proj0``) over C channels; a clear error otherwise."""
    out = []
    for e, w in enumerate(experts):
        if type(w) is not ExpertWeights:
            if isinstance(w, torch.Tensor) or len(w) != PER_EXPERT:
                raise _expert_error(e, w, C)
            w = ExpertWeights(*w)
        if not _shapes_match(w, C):
            raise _expert_error(e, w, C)
        out.append(w)
    return out


def check_experts(x: torch.Tensor, shared: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, k: int,
                  weights: Sequence[ExpertWeights], windows: Sequence[int], depths: Sequence[int]) -> List[ExpertWeights]:
    """Raise a clear error for any input :func:`experts` does not accept; returns the weights as
    :class:`ExpertWeights`, each on x's device and in x's dtype."""
    check_tensor("x", x, 4)
    check_tensor("shared", shared, 4)
    if shared.shape != x.shape:
        raise ValueError(f"shared has shape {tuple(shared.shape)} but x has {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): the expert stage needs B >= 1 images")
    check_same(("x", "shared"), (x, shared), "both")
    E = len(windows)
    if len(depths) != E or len(weights) != E:
        raise ValueError(f"expected {E} experts' weights ({PER_EXPERT} weights per expert, an ExpertWeights each) "
                         f"and one window and depth per expert; got {len(weights)} experts' weights, {len(windows)} "
                         f"windows, {len(depths)} depths")
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    ws = check_expert_weights(weights, x.shape[1])
    check_routing(perm, offsets, x.shape[0] * k, E, x.device)
    device, dtype = x.device, x.dtype
    for e, w in enumerate(ws):
        for name, t in zip(ExpertWeights._fields, w):
            if t.device != device or t.dtype != dtype:
                raise ValueError(f"expert {e} weight {name} is on {t.device} in {t.dtype}, but x is on {device} "
                                 f"in {dtype}; every weight must match x")
    return ws


DECLARATION = declare(
    "moe_experts", "(Tensor x, Tensor shared, Tensor perm, Tensor offsets, SymInt k, Tensor[] weights, SymInt[] windows, "
                   "SymInt[] depths) -> Tensor",
    family="expert stage", fake=_fake, check=check_experts,
    backward=Backward("(Tensor grad, Tensor x, Tensor shared, Tensor perm, Tensor offsets, SymInt k, Tensor[] weights, "
                      "SymInt[] windows, SymInt[] depths) -> Tensor[]", _backward_fake, _experts_setup, _experts_bwd,
                      run=_run_backward),
    # the per-expert loop is faster in eager mode, but it reads the routing on the host, which would make
    # ``auto`` impossible to capture in a CUDA graph: the kernels first
    cuda_order=backends.DEFAULT_CUDA_ORDER, run=_run)
DISPATCH, BACKWARD_DISPATCH = DECLARATION.dispatch, DECLARATION.backward.dispatch


@autocast_entry
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
    ws = check_experts(x, shared, perm, offsets, k, weights, windows, depths)
    return DECLARATION.op(x.contiguous(), shared.contiguous(), perm, offsets, int(k), [t.contiguous() for w in ws for t in w],
                          [int(w) for w in windows], [int(d) for d in depths])


# the public entry points (moce_kernels.ops exports these names)
moe_experts = experts
__all__ = ["moe_experts"]
