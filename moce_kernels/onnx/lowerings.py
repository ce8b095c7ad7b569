"""ONNX lowerings: every ``moce_kernels.ops`` op written in plain, exportable ATen ops.

One function per op, with the op's Python signature (the arguments of ``moce_kernels.ops.<name>``,
returning what it returns), registered in :data:`LOWERINGS` under the op's name. Each computes what
the op's reference computes, in the same compute dtype (float32 for float16 inputs), with shapes
that stay symbolic in a trace: no host reads, no shape-dependent Python branches, no data-dependent
output sizes. Traced by ``torch.onnx.export``, they become standard ONNX operators only (Conv,
MatMul, Gather, TopK, ScatterElements, ...).

Two ops need another form than their reference:

- ``window_fft_attention``: the per-window 2-D circular convolution as DFT-matrix products. For a
  p x p window Q, ``F = C - iS`` (``C[u, a] = cos(2 pi u a / p)``, ``S`` the sine) gives
  ``DFT(Q) = F Q F``; with ``T = [C | S]`` (p x 2p) the four real products ``CQC, CQS, SQC, SQS``
  are the blocks of ``T^T Q T`` (two matmuls), and the inverse of the spectrum product ``P`` is
  ``Re(F* P F*) / p^2 = T [[Pr, -Pi], [-Pi, -Pr]] T^T / p^2``: exact circular convolution, no FFT op.
- the routed expert stage: ``moe_experts`` runs every expert on every image (static shapes) and
  gathers, for each row of the routing (expert e's segment of ``perm``), expert e's output on that
  row's image; ``moe_combine`` gathers each image's k rows and sums them with their gates. An expert
  an image did not choose is never read for it: its output (even NaN or inf) contributes nothing.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..expert_stage.weights import PER_EXPERT, ExpertWeights
from ..ops import declaration
from ..reference import channel_attention as _ref_attention
from ..reference import expert_conv as _ref_conv
from ..reference import norm_conv as _ref_norm
from ..reference import routing as _ref_routing
from ..reference.window_attention import channel_layer_norm

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else computes in float32 (as the references do)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- window FFT attention
def dft_basis(p: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``T = [C | S]`` (p, 2p): ``C[u, a] = cos(2 pi u a / p)``, ``S[u, a] = sin(2 pi u a / p)``, the
    angles reduced mod p in integers (exact table, computed in float64)."""
    n = torch.arange(p, dtype=torch.float64, device=device)
    ang = (n[:, None] * n[None, :]).remainder(p) * (2.0 * math.pi / p)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).to(dtype)


def _spectrum(t: Tensor, basis: Tensor, p: int) -> Tuple[Tensor, Tensor]:
    """Real and imaginary parts of the 2-D DFT of every (..., p, p) window of t."""
    m = basis.transpose(0, 1) @ t @ basis  # (..., 2p, 2p): [[CtC, CtS], [StC, StS]]
    ctc, cts = m[..., :p, :p], m[..., :p, p:]
    stc, sts = m[..., p:, :p], m[..., p:, p:]
    return ctc - sts, -(cts + stc)


def circular_window_conv(q: Tensor, k: Tensor, p: int) -> Tensor:
    """(B, C, H, W) q and k, zero-padded at the bottom/right to multiples of p: per p x p window and
    channel the circular convolution of q with k, cropped back to (B, C, H, W). DFT-matrix products."""
    B, C, H, W = q.shape
    nh, nw = (H + p - 1) // p, (W + p - 1) // p

    def windows(t: Tensor) -> Tensor:
        t = F.pad(t, (0, nw * p - W, 0, nh * p - H))
        return t.reshape(B, C, nh, p, nw, p).transpose(3, 4)  # (B, C, nh, nw, p, p)

    basis = dft_basis(p, q.dtype, q.device)
    qr, qi = _spectrum(windows(q), basis, p)
    kr, ki = _spectrum(windows(k), basis, p)
    pr, pi = qr * kr - qi * ki, qr * ki + qi * kr
    m = torch.cat([torch.cat([pr, -pi], dim=-1), torch.cat([-pi, -pr], dim=-1)], dim=-2)
    conv = (basis @ m @ basis.transpose(0, 1)) * (1.0 / (p * p))  # (B, C, nh, nw, p, p)
    return conv.transpose(3, 4).reshape(B, C, nh * p, nw * p)[:, :, :H, :W]


def window_fft_attention(q: Tensor, k: Tensor, v: Tensor, window_size: int, norm_weight: Tensor,
                         norm_bias: Tensor, eps: float = 1e-5) -> Tensor:
    """``LN_C(crop(circconv_p(q, k))) * v`` (B, C, H, W) in q's dtype, computed in float32 (float64)."""
    cdt = _compute_dtype(q.dtype)
    conv = circular_window_conv(q.to(cdt), k.to(cdt), int(window_size))
    out = channel_layer_norm(conv, norm_weight.to(cdt), norm_bias.to(cdt), eps) * v.to(cdt)
    return out.to(q.dtype)


# ---------------------------------------------------------------- convolutions and the trunk
def pointwise_depthwise_conv(x: Tensor, pw_weight: Tensor, dw_weight: Tensor, pw_bias: Optional[Tensor] = None,
                             dw_bias: Optional[Tensor] = None) -> Tensor:
    """``dw(pw(x))`` (B, C_out, H, W): the reference's two convolutions."""
    return _ref_conv.pointwise_depthwise_conv(x, pw_weight, dw_weight, pw_bias, dw_bias)


def pointwise_depthwise_conv_gated(x: Tensor, pw_weight: Tensor, dw_weight: Tensor, pw_bias: Optional[Tensor] = None,
                                   dw_bias: Optional[Tensor] = None) -> Tensor:
    """``gelu(a) * b`` of the halves of ``dw(pw(x))``, (B, C_out/2, H, W)."""
    return _ref_conv.pointwise_depthwise_conv_gated(x, pw_weight, dw_weight, pw_bias, dw_bias)


def layer_norm_pointwise_depthwise_conv(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor],
                                        pw_weight: Tensor, dw_weight: Tensor, pw_bias: Optional[Tensor] = None,
                                        dw_bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``dw(pw(LN(x)))`` (B, C_out, H, W)."""
    return _ref_norm.layer_norm_pointwise_depthwise_conv(x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias,
                                                         dw_bias, eps)


def layer_norm_pointwise_depthwise_conv_gated(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor],
                                              pw_weight: Tensor, dw_weight: Tensor, pw_bias: Optional[Tensor] = None,
                                              dw_bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``gelu(a) * b`` of the halves of ``dw(pw(LN(x)))``, (B, C_out/2, H, W)."""
    return _ref_norm.layer_norm_pointwise_depthwise_conv(x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias,
                                                         dw_bias, eps, gated=True)


def layer_norm_pointwise_conv(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], weight: Tensor,
                              bias: Optional[Tensor] = None, eps: float = 1e-5,
                              chunks: int = 1) -> Union[Tensor, Tuple[Tensor, ...]]:
    """``conv2d(LN(x), weight, bias)``; a tuple of its ``chunks`` channel groups when chunks > 1."""
    y = F.conv2d(_ref_norm.layer_norm(x, norm_weight, norm_bias, eps), weight, bias)
    return y if chunks == 1 else tuple(y.chunk(chunks, dim=1))


def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                   residual: Optional[Tensor] = None) -> Tensor:
    """``conv2d(x, weight, bias) + residual`` (B, C_out, H, W)."""
    return _ref_norm.pointwise_conv(x, weight, bias, residual)


def channel_attention(q: Tensor, k: Tensor, v: Tensor, temperature: Tensor, proj_weight: Tensor,
                      proj_bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                      eps: float = 1e-12) -> Tensor:
    """MDTA's transposed attention, ``project_out`` and ``+ residual`` (B, C, H, W), in float32."""
    return _ref_attention.channel_attention(q, k, v, temperature, proj_weight, proj_bias, residual, eps)


# ---------------------------------------------------------------- routing
def moe_route(x: Tensor, freq_emb: Tensor, gate_weight: Tensor, freq_weight: Tensor, complexity: Tensor,
              noise: Tensor, k: int, noise_std: float, compute_loss: bool, use_complexity: bool = True):
    """Eval router: gates (B, k), indices (B, k) int64, logits (B, E), loss () = 0.

    The top-k of ``softmax(logits + noise)`` by ``torch.topk`` (ONNX TopK: ties to the lower index, the
    reference's order). The auxiliary loss is a training quantity: ``compute_loss`` is refused."""
    if compute_loss:
        raise ValueError("moe_route's ONNX lowering is for inference: compute_loss=True (a model in training "
                         "mode) has no lowering; call model.eval() first")
    logits = _ref_routing.router_logits(x, freq_emb, gate_weight, freq_weight)
    scores = (logits + noise.to(logits.dtype)).softmax(dim=-1)
    gates, indices = torch.topk(scores, int(k), dim=-1, largest=True, sorted=True)
    return gates, indices, logits, logits.new_zeros(())


def _slot_positions(indices: Tensor) -> Tensor:
    """(B*k,) int64: the position of slot ``b*k+j`` in the expert-sorted order (stable), by counting
    the slots whose (expert, slot) key is smaller; no sort op."""
    flat = indices.reshape(-1)
    slots = torch.arange(flat.shape[0], device=flat.device)
    key = flat * flat.shape[0] + slots
    return (key[None, :] < key[:, None]).sum(dim=1)


def _inverse(perm: Tensor) -> Tensor:
    """The inverse of the permutation ``perm`` (n,): ``inv[perm[r]] = r``."""
    rows = torch.arange(perm.shape[0], device=perm.device)
    return torch.zeros_like(perm).scatter(0, perm, rows)


def moe_dispatch(indices: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    """counts (E,), offsets (E+1,), perm (B*k,), int64: slots grouped by expert, ties in slot order."""
    experts = torch.arange(int(num_experts), device=indices.device)
    counts = (indices.reshape(1, -1) == experts[:, None]).sum(dim=1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return counts, offsets, _inverse(_slot_positions(indices))


def _expert_forward(x: Tensor, shared: Tensor, w: ExpertWeights, window: int, depth: int) -> Tensor:
    """An expert of depth d chains d steps of ``x + proj2(body(proj0(x)) * silu(proj1(shared)))``."""
    for _ in range(depth):
        z = F.conv2d(x, w.proj0)
        q = _ref_conv.pointwise_depthwise_conv(z, w.q, w.q_dw, None, w.q_dw_bias)
        k, v = _ref_conv.pointwise_depthwise_conv(z, w.kv, w.kv_dw, None, w.kv_dw_bias).chunk(2, dim=1)
        a = window_fft_attention(q, k, v, window, w.norm_weight, w.norm_bias)
        body = F.conv2d(a, w.proj_out, w.proj_out_bias)
        x = F.conv2d(body * F.silu(F.conv2d(shared, w.proj1)), w.proj2) + x
    return x


def _as_expert_weights(weights: Sequence) -> List[ExpertWeights]:
    """One ExpertWeights per expert, from ExpertWeights (or 13-tensor sequences) or the flat list."""
    if len(weights) and isinstance(weights[0], Tensor):
        return [ExpertWeights(*weights[i:i + PER_EXPERT]) for i in range(0, len(weights), PER_EXPERT)]
    return [ExpertWeights(*w) for w in weights]


def moe_experts(x: Tensor, shared: Tensor, perm: Tensor, offsets: Tensor, k: int, weights: Sequence[ExpertWeights],
                windows: Sequence[int], depths: Sequence[int]) -> Tensor:
    """(B*k, C, H, W): row r of expert e's segment is expert e applied to image ``perm[r] // k``.

    Every expert runs on every image; row r gathers expert e(r)'s output on its image, e(r) the
    number of segment ends ``offsets[1:]`` at or below r."""
    ws = _as_expert_weights(weights)
    B = x.shape[0]
    outs = torch.cat([_expert_forward(x, shared, w, int(p), int(d)) for w, p, d in zip(ws, windows, depths)])
    rows = torch.arange(perm.shape[0], device=perm.device)
    expert = (rows[:, None] >= offsets[None, 1:]).sum(dim=1)
    return outs.index_select(0, expert * B + torch.div(perm, k, rounding_mode="floor"))


def moe_combine(expert_out: Tensor, gates: Tensor, perm: Tensor) -> Tensor:
    """(B, C, H, W): ``out[b] = sum_j gates[b, j] * expert_out[pos(b*k + j)]``, summed in j order
    in float32 (float64), returned in expert_out's dtype."""
    B, k = gates.shape
    cdt = _compute_dtype(expert_out.dtype)
    rows = expert_out.index_select(0, _inverse(perm)).to(cdt)
    rows = rows.reshape((B, k) + tuple(expert_out.shape[1:]))
    g = gates.to(cdt)
    out = g[:, 0, None, None, None] * rows[:, 0]
    for j in range(1, k):
        out = out + g[:, j, None, None, None] * rows[:, j]
    return out.to(expert_out.dtype)


LOWERINGS: Dict[str, Callable] = {
    "window_fft_attention": window_fft_attention,
    "pointwise_depthwise_conv": pointwise_depthwise_conv,
    "pointwise_depthwise_conv_gated": pointwise_depthwise_conv_gated,
    "layer_norm_pointwise_depthwise_conv": layer_norm_pointwise_depthwise_conv,
    "layer_norm_pointwise_depthwise_conv_gated": layer_norm_pointwise_depthwise_conv_gated,
    "layer_norm_pointwise_conv": layer_norm_pointwise_conv,
    "pointwise_conv": pointwise_conv,
    "channel_attention": channel_attention,
    "moe_route": moe_route,
    "moe_dispatch": moe_dispatch,
    "moe_experts": moe_experts,
    "moe_combine": moe_combine,
}

"""Op name (as in ``moce_kernels.ops``) -> its lowering."""

for _name, _lowering in LOWERINGS.items():  # each op's declaration carries its lowering
    declaration(_name).lowering = _lowering
