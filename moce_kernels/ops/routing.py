"""Routed expert dispatch for the MoCE layer: router, dispatch, combine (the expert stage between
dispatch and combine: :mod:`.expert_stage`).

Every op here keeps its shapes independent of the routing (sized by B * k), so a forward
needs no host synchronisation on the fast backends.

Slots: ``s = b * k + j`` is image b's j-th choice. ``perm`` (B*k,) lists the slots sorted by
expert (stable); expert e owns ``perm[offsets[e]:offsets[e+1]]`` and the same rows of the
expert-stage output.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ._common import (check_index_tensor, check_permutation, check_positive, check_same, check_segments, check_tensor,
                      debug_checks)
from ._declare import Backward, autocast_entry, declare


# ---------------------------------------------------------------- router
def _route_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _route_fake(x, freq_emb, gate_weight, freq_weight, complexity, noise, k, noise_std, compute_loss, use_complexity):
    B, E, dt = x.shape[0], gate_weight.shape[0], _route_dtype(x)
    return (x.new_empty(B, k, dtype=dt), x.new_empty(B, k, dtype=torch.int64), x.new_empty(B, E, dtype=dt),
            x.new_empty((), dtype=dt))


def _route_backward_fake(grad_gates, grad_logits, grad_loss, x, freq_emb, gate_weight, freq_weight, *rest):
    return (torch.empty_like(x), torch.empty_like(freq_emb), torch.empty_like(gate_weight),
            torch.empty_like(freq_weight))


def _route_setup(ctx, inputs, output):
    x, freq_emb, gate_weight, freq_weight, complexity, noise, k, noise_std, compute_loss, use_complexity = inputs
    ctx.save_for_backward(x, freq_emb, gate_weight, freq_weight, complexity, noise)
    ctx.args = (k, noise_std, compute_loss, use_complexity)
    ctx.mark_non_differentiable(output[1])


def _route_bwd(ctx, g_gates, g_indices, g_logits, g_loss):
    x, freq_emb, gate_weight, freq_weight, complexity, noise = ctx.saved_tensors
    k = ctx.args[0]
    B, E = x.shape[0], gate_weight.shape[0]
    dt = _route_dtype(x)
    zeros = lambda *s: x.new_zeros(s, dtype=dt)  # noqa: E731
    g_gates = zeros(B, k) if g_gates is None else g_gates.contiguous()
    g_logits = zeros(B, E) if g_logits is None else g_logits.contiguous()
    g_loss = zeros() if g_loss is None else g_loss
    gx, gf, ggw, gfw = ROUTE.backward.op(g_gates, g_logits, g_loss, x, freq_emb, gate_weight, freq_weight, complexity,
                                         noise, *ctx.args)
    return gx, gf, ggw, gfw, None, None, None, None, None, None


def check_route(x: torch.Tensor, freq_emb: torch.Tensor, gate_weight: torch.Tensor, freq_weight: torch.Tensor,
                complexity: torch.Tensor, noise: torch.Tensor, k: int, noise_std: float) -> None:
    """Raise a clear error for any input :func:`route` does not accept."""
    check_tensor("x", x, 4)
    check_tensor("freq_emb", freq_emb, 2)
    check_tensor("gate_weight", gate_weight, 2)
    check_tensor("freq_weight", freq_weight, 2)
    check_tensor("complexity", complexity, 1)
    check_tensor("noise", noise, 2)
    B, C = x.shape[:2]
    E = gate_weight.shape[0]
    if gate_weight.shape[1] != C:
        raise ValueError(f"gate_weight must be ({E}, {C}) for x with {C} channels, got {tuple(gate_weight.shape)}")
    if freq_emb.shape[0] != B or freq_weight.shape != (E, freq_emb.shape[1]):
        raise ValueError(f"freq_emb {tuple(freq_emb.shape)} and freq_weight {tuple(freq_weight.shape)} must be "
                         f"(B={B}, F) and (E={E}, F)")
    if complexity.shape[0] != E or tuple(noise.shape) != (B, E):
        raise ValueError(f"complexity must be ({E},) and noise ({B}, {E}); got {tuple(complexity.shape)} "
                         f"and {tuple(noise.shape)}")
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)) or not 1 <= k <= E:
        raise ValueError(f"k must be in [1, {E}] (an integer), got {k!r}")
    if B == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): the router needs B >= 1 images")
    check_positive("noise_std", noise_std)
    check_same(("x", "freq_emb", "gate_weight", "freq_weight", "complexity", "noise"),
               (x, freq_emb, gate_weight, freq_weight, complexity, noise), "device")


ROUTE = declare(
    "moe_route", "(Tensor x, Tensor freq_emb, Tensor gate_weight, Tensor freq_weight, Tensor complexity, Tensor noise, "
                 "SymInt k, float noise_std, bool compute_loss, bool use_complexity) -> (Tensor, Tensor, Tensor, Tensor)",
    family="routing", fake=_route_fake, check=check_route,
    backward=Backward("(Tensor grad_gates, Tensor grad_logits, Tensor grad_loss, Tensor x, Tensor freq_emb, "
                      "Tensor gate_weight, Tensor freq_weight, Tensor complexity, Tensor noise, SymInt k, "
                      "float noise_std, bool compute_loss, bool use_complexity) -> (Tensor, Tensor, Tensor, Tensor)",
                      _route_backward_fake, _route_setup, _route_bwd))


@autocast_entry
def route(x: torch.Tensor, freq_emb: torch.Tensor, gate_weight: torch.Tensor, freq_weight: torch.Tensor,
          complexity: torch.Tensor, noise: torch.Tensor, k: int, noise_std: float, compute_loss: bool,
          use_complexity: bool = True):
    """Per-image top-k router.

    ``logits = gate_weight @ mean_HW(x) + freq_weight @ freq_emb``; ``scores = softmax(logits + noise)``;
    the top-k scores (not renormalised) are the gates. With ``compute_loss``, also the auxiliary loss
    ``0.5 * cv2(importance) + 0.5 * cv2(load)`` (importance times ``complexity`` when ``use_complexity``;
    load uses ``noise_std`` as the noise scale even when ``noise`` is zero).

    Args:
        x: (B, C, H, W).  freq_emb: (B, F).  gate_weight: (E, C).  freq_weight: (E, F).
        complexity: (E,).  noise: (B, E), already scaled (zeros for no noise).
    Returns:
        gates (B, k) float32, indices (B, k) int64, logits (B, E) float32 (noise-free), loss () float32
        (float64 throughout for float64 input).
    """
    check_route(x, freq_emb, gate_weight, freq_weight, complexity, noise, k, noise_std)
    return ROUTE.op(x.contiguous(), freq_emb.contiguous(), gate_weight.contiguous(), freq_weight.contiguous(),
                  complexity.contiguous(), noise.contiguous(), int(k), float(noise_std), bool(compute_loss),
                  bool(use_complexity))


# ---------------------------------------------------------------- dispatch
def _dispatch_fake(indices, num_experts):
    n = indices.numel()
    return (indices.new_empty(num_experts, dtype=torch.int64), indices.new_empty(num_experts + 1, dtype=torch.int64),
            indices.new_empty(n, dtype=torch.int64))


DISPATCH = declare("moe_dispatch", "(Tensor indices, SymInt num_experts) -> (Tensor, Tensor, Tensor)",
                   family="routing", fake=_dispatch_fake)


def dispatch(indices: torch.Tensor, num_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group slots by expert on the device.

    Args:
        indices: (B, k) int64 expert of each slot.
    Returns:
        counts (E,), offsets (E+1,), perm (B*k,) — all int64; perm lists slot ids ``b*k+j`` sorted by
        expert, ties in slot order.
    Indices outside [0, E) are an error under ``MOCE_DEBUG_CHECKS=1`` (a check that reads the device);
    otherwise their slots belong to no expert's segment.
    """
    check_tensor("indices", indices, 2, (torch.int64,))
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if debug_checks() and indices.numel() and not bool(((indices >= 0) & (indices < num_experts)).all()):
        raise ValueError(f"indices must lie in [0, {num_experts}), got {indices.tolist()}")
    return DISPATCH.op(indices.contiguous(), int(num_experts))


# ---------------------------------------------------------------- routing tables
def check_routing(perm: torch.Tensor, offsets: torch.Tensor, rows: int, num_experts: int,
                  device: torch.device) -> None:
    """``perm`` (rows,) and ``offsets`` (E+1,) as :func:`dispatch` makes them: shapes, dtype and device
    always; under ``MOCE_DEBUG_CHECKS=1`` also their values (a permutation; segments from 0 to rows)."""
    check_index_tensor("perm", perm, (rows,), device)
    check_index_tensor("offsets", offsets, (num_experts + 1,), device)
    if debug_checks():
        check_permutation("perm", perm)
        check_segments("offsets", offsets, rows)


# ---------------------------------------------------------------- combine
def _combine_fake(expert_out, gates, perm):
    return expert_out.new_empty((gates.shape[0],) + tuple(expert_out.shape[1:]))


def _combine_backward_fake(grad, expert_out, gates, perm):
    return torch.empty_like(expert_out), torch.empty_like(gates)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_bwd(ctx, grad):
    expert_out, gates, perm = ctx.saved_tensors
    g_eo, g_gates = COMBINE.backward.op(grad.contiguous(), expert_out, gates, perm)
    return g_eo, g_gates, None


COMBINE = declare(
    "moe_combine", "(Tensor expert_out, Tensor gates, Tensor perm) -> Tensor", family="routing", fake=_combine_fake,
    backward=Backward("(Tensor grad, Tensor expert_out, Tensor gates, Tensor perm) -> (Tensor, Tensor)",
                      _combine_backward_fake, _combine_setup, _combine_bwd))


@autocast_entry
def combine(expert_out: torch.Tensor, gates: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Deterministic gated sum: ``out[b] = sum_j gates[b, j] * expert_out[pos(b*k + j)]``.

    Args:
        expert_out: (B*k, C, H, W) from ``moe_experts``.  gates: (B, k).  perm: (B*k,) from :func:`dispatch`.
    Returns:
        (B, C, H, W) in expert_out's dtype (accumulated in float32).
    """
    check_tensor("expert_out", expert_out, 4)
    check_tensor("gates", gates, 2)
    B, k = gates.shape
    if expert_out.shape[0] != B * k or perm.shape != (B * k,):
        raise ValueError(f"expert_out must have B*k={B * k} rows and perm ({B * k},); got {expert_out.shape[0]} "
                         f"rows and perm {tuple(perm.shape)}")
    check_same(("expert_out", "gates", "perm"), (expert_out, gates, perm), "device")
    check_index_tensor("perm", perm, (B * k,), expert_out.device)
    if debug_checks():
        check_permutation("perm", perm)
    return COMBINE.op(expert_out.contiguous(), gates.contiguous(), perm.contiguous())


# the public entry points (moce_kernels.ops exports these names)
moe_route, moe_dispatch, moe_combine = route, dispatch, combine
__all__ = ["moe_route", "moe_dispatch", "moe_combine"]
