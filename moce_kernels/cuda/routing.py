"""Backend ``cuda`` for the routing ops: thin wrappers around ``torch.ops.moce_C.moe_*`` (csrc/routing).

Outputs are allocated here with :func:`moce_kernels.outputs.new_output` and written by the kernels; the
small router tensors (freq_emb, weights, complexity, noise and the incoming grads of gates, logits and
loss) are passed as fp32 (a few KB). Registered for float32, float16 and bfloat16; float64 calls run
the reference (:func:`moce_kernels.backends.resolve`).
"""
from __future__ import annotations

import torch

from . import extension  # noqa: F401  (registers torch.ops.moce_C)

from ..backends import FP32_AND_16BIT, register
from ..outputs import new_output

_ops = torch.ops.moce_C


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


@register("moe_route", "cuda", dtypes=FP32_AND_16BIT)
def route(x, freq_emb, gate_weight, freq_weight, complexity, noise, k, noise_std, compute_loss, use_complexity):
    """gates (B, k) fp32, indices (B, k) int64, logits (B, E) fp32, loss () fp32."""
    B, E, dev = x.shape[0], gate_weight.shape[0], x.device
    gates = new_output((B, k), torch.float32, dev)
    indices = new_output((B, k), torch.int64, dev)
    logits = new_output((B, E), torch.float32, dev)
    loss = new_output((), torch.float32, dev)
    _ops.moe_route_forward(x, _f32(freq_emb), _f32(gate_weight), _f32(freq_weight), _f32(complexity), _f32(noise),
                           int(k), float(noise_std), bool(compute_loss), bool(use_complexity), gates, indices, logits,
                           loss)
    return gates, indices, logits, loss


@register("moe_route_backward", "cuda", dtypes=FP32_AND_16BIT)
def route_backward(grad_gates, grad_logits, grad_loss, x, freq_emb, gate_weight, freq_weight, complexity, noise,
                   k, noise_std, compute_loss, use_complexity):
    """(grad_x, grad_freq_emb, grad_gate_weight, grad_freq_weight) in the inputs' dtypes."""
    dev = x.device
    gx = new_output(x.shape, x.dtype, dev)
    gfe = new_output(freq_emb.shape, torch.float32, dev)
    ggw = new_output(gate_weight.shape, torch.float32, dev)
    gfw = new_output(freq_weight.shape, torch.float32, dev)
    _ops.moe_route_backward(_f32(grad_gates), _f32(grad_logits), _f32(grad_loss), x, _f32(freq_emb),
                            _f32(gate_weight), _f32(freq_weight), _f32(complexity), _f32(noise), int(k),
                            float(noise_std), bool(compute_loss), bool(use_complexity), gx, gfe, ggw, gfw)
    return gx, gfe.to(freq_emb.dtype), ggw.to(gate_weight.dtype), gfw.to(freq_weight.dtype)


@register("moe_dispatch", "cuda")
def dispatch(indices, num_experts):
    """counts (E,), offsets (E+1,), perm (B*k,) int64; perm = slot ids sorted by expert, stable."""
    dev, n = indices.device, indices.numel()
    counts = new_output((num_experts,), torch.int64, dev)
    offsets = new_output((num_experts + 1,), torch.int64, dev)
    perm = new_output((n,), torch.int64, dev)
    _ops.moe_dispatch(indices, int(num_experts), counts, offsets, perm)
    return counts, offsets, perm


@register("moe_combine", "cuda", dtypes=FP32_AND_16BIT)
def combine(expert_out, gates, perm):
    """(B, C, H, W): out[b] = sum_j gates[b, j] * expert_out[pos(b*k + j)] (fp32 accumulation)."""
    out = new_output((gates.shape[0],) + tuple(expert_out.shape[1:]), expert_out.dtype, expert_out.device)
    _ops.moe_combine(expert_out, _f32(gates), perm, out)
    return out


@register("moe_combine_backward", "cuda", dtypes=FP32_AND_16BIT)
def combine_backward(grad, expert_out, gates, perm):
    """(grad_expert_out, grad_gates) in the inputs' dtypes."""
    geo = new_output(expert_out.shape, expert_out.dtype, expert_out.device)
    ggates = new_output(gates.shape, torch.float32, gates.device)
    _ops.moe_combine_backward(grad, expert_out, _f32(gates), perm, geo, ggates)
    return geo, ggates.to(gates.dtype)
