"""Triton backend of the LayerNorm-folded convolutions and the 1x1 with a residual (:mod:`..ops.norm_conv`).

Forward: the LayerNorm is folded into the 1x1 stage of the existing kernels (constexpr ``NORM`` of
``_halo_pw`` in the fused pw->dw kernel, and of the grouped 1x1 ``_gemm_kernel``; see
``_ln_fold_step`` in :mod:`.expert_conv`). While x streams through the 1x1's K loop, the kernel sums,
per pixel, ``x - s`` and ``(x - s)^2`` with ``s`` the pixel's channel-0 value (a shift that keeps the
fp32 sums from cancelling when |mean| >> std), and, per output channel, ``W' = W diag(gamma)`` (as
rounded for the product) and ``W beta``; the product runs on ``W'`` and ``x - s``. After the loop,
``pw(LN(x)) = rstd (W'(x - s) - (mean - s) W'1) + W beta + b`` (BiasFree: ``rstd (W'(x - s) + s W'1) + b``).
No statistics kernel, no weight preprocessing, and the normalised tensor never reaches memory.
The residual of ``pointwise_conv`` is added in ``_gemm_kernel``'s epilogue (its ``r_ptr``).
``layer_norm_pointwise_conv`` with ``chunks`` runs as one grouped ``_gemm_kernel`` launch whose
"experts" are the chunks (rows ``e*B + n`` read image n, use weight rows ``e*C_out/chunks ...``).

Backward: ``LN(x)`` is materialised once (``_ln_fwd_kernel``: mean and variance in two passes over C,
per-pixel mean/rstd kept for the LN backward); the existing pw->dw / 1x1 backward kernels run on it
(``pwdw_backward`` of :mod:`..expert_stage.driver`, ``_wgrad_kernel``, ``_gemm_kernel``); then
``_ln_bwd_kernel`` gives grad x and per-program partial sums of the LayerNorm's weight / bias grads,
reduced in a fixed order (deterministic). The conv weight grads use the existing kernels' atomics.

Cost per call (every bias present) beside the eager trunk (the model's ``LayerNorm`` module, then the
op that follows). Launches: the kernels a GPU runs, counted on the CPU (our Triton launches plus the
fills, dtype copies and reductions around them; for eager, the dispatcher's compute ops). Bytes per
pixel, ``s`` bytes per element, x with C channels, the 1x1 with C_o outputs (MDTA qkv: C_o = 3C; GDFN:
C_o = 4C): DRAM traffic of an analytic model (every op reads its inputs and writes its outputs once;
the fused kernels' halo and channel-block re-reads assumed to hit L1/L2). Not timed on a GPU.

  call                                     launches: fused | eager           bytes: fused | eager
  layer_norm_pointwise_depthwise_conv      fwd 1 | 8 LN + 2 cuDNN             (C + C_o) s | (12 C + 3 C_o) s
                                           bwd 15 | 21 LN + cuDNN's 4+      (8 C + 4 C_o) s | (39 C + 8 C_o) s
    MDTA qkv (C_o = 3C)                                                       fwd 4 C s | 21 C s; bwd 20 C s | 63 C s
  ..._gated (GDFN, C_o = 4C, out C_o/2)    fwd 1 | 8 + 2 cuDNN + gelu, mul    3 C s | 34 C s
                                           bwd 16                            (9 C + 5.5 C_o) s = 31 C s
  layer_norm_pointwise_conv, chunks = 2    fwd 1 | 8 + 2 cuDNN 1x1            3 C s | 15 C s
    (the decoder's two C -> C projections) bwd 11 | 21 + 2 conv backward     13 C s | 48 C s
  pointwise_conv(x, w, b, residual)        fwd 1 | 1x1 + add                  (C_in + 2 C_o) s | (C_in + 4 C_o) s
                                           bwd 6 | cuDNN's dgrad, wgrad, bias grad

Fused backward launches: layer_norm_pointwise_depthwise_conv = _ln_fwd, _pwdw_bwd, _wgrad, _gemm,
_ln_bwd (gated: + the _pwdw gating epilogue) + 4 zero-fills of the weight-grad accumulators + 4 dtype
copies of the conv weight grads + 2 reductions of the LayerNorm grads' partials; layer_norm_pointwise_conv
= _ln_fwd, one _wgrad for all chunks, one _gemm per chunk, _ln_bwd + 2 fills + 2 copies + 2 reductions;
pointwise_conv = _wgrad, _gemm + 2 fills + 2 copies. The eager LayerNorm forward is 8 launches moving
~11 C s (mean, sub, mul, mean, add, rsqrt, mul, addcmul); its autograd backward 21 ops (18 BiasFree)
moving ~37 C s. The caller that concatenates the decoder's two weights per call adds 2 small cats.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backends import register
from ..expert_stage import driver
from ..expert_stage.driver import accumulation_dtype, device_table, grad_dtype
from ..expert_stage.layouts import GemmCol, WgradCol, meta_row
from ..outputs import new_output
from . import expert_conv as xc
from .expert_stage import KERNELS, TritonExpertStage
from ._host import cdiv

Tensor = torch.Tensor


@triton.jit
def _ln_z(x, mean, rstd, NORM: tl.constexpr):
    """What the LayerNorm's weight multiplies: (x - mean) rstd (NORM 1, WithBias) or x rstd (2, BiasFree)."""
    if NORM == 1:
        return (x - mean[None, :]) * rstd[None, :]
    else:
        return x * rstd[None, :]


@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, n_ptr, stats_ptr, C, HW, n_pt, eps, NORM: tl.constexpr, BC: tl.constexpr,
                   BP: tl.constexpr, F64: tl.constexpr):
    """n = LN(x) (n's dtype) for BP pixels of one image; stats[img] = (mean, rstd) per pixel. Mean and
    variance in two passes over C (the tile is re-read from L1/L2)."""
    pid = tl.program_id(0)
    img = pid // n_pt
    p = (pid % n_pt) * BP + tl.arange(0, BP)
    pm = p < HW
    base = img.to(tl.int64) * C * HW
    if F64:
        s = tl.zeros([BP], dtype=tl.float64)
    else:
        s = tl.zeros([BP], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        s += tl.sum(tl.load(x_ptr + base + c[:, None].to(tl.int64) * HW + p[None, :],
                            mask=(c < C)[:, None] & pm[None, :], other=0.0).to(s.dtype), axis=0)
    mean = s / C
    q = s * 0.0
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        m2 = (c < C)[:, None] & pm[None, :]
        x = tl.load(x_ptr + base + c[:, None].to(tl.int64) * HW + p[None, :], mask=m2, other=0.0).to(s.dtype)
        d = tl.where(m2, x - mean[None, :], 0.0)
        q += tl.sum(d * d, axis=0)
    rstd = 1.0 / tl.sqrt(q / C + eps)
    sbase = img.to(tl.int64) * 2 * HW
    tl.store(stats_ptr + sbase + p, mean, mask=pm)
    tl.store(stats_ptr + sbase + HW + p, rstd, mask=pm)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < C
        m2 = cm[:, None] & pm[None, :]
        offs = base + c[:, None].to(tl.int64) * HW + p[None, :]
        y = _ln_z(tl.load(x_ptr + offs, mask=m2, other=0.0).to(s.dtype), mean, rstd, NORM)
        y = y * tl.load(w_ptr + c, mask=cm, other=0.0).to(s.dtype)[:, None]
        if NORM == 1:
            y += tl.load(b_ptr + c, mask=cm, other=0.0).to(s.dtype)[:, None]
        tl.store(n_ptr + offs, y.to(n_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _ln_bwd_kernel(g_ptr, x_ptr, w_ptr, stats_ptr, gx_ptr, part_ptr, C, HW, n_pt, total, NORM: tl.constexpr,
                   BC: tl.constexpr, BP: tl.constexpr, F64: tl.constexpr):
    """Given g = dL/dLN(x): gx = rstd (gh - mean_c(gh) - xhat mean_c(gh z)) (BiasFree: without mean_c(gh)),
    gh = g w, xhat = (x - mean) rstd, z = _ln_z. Program pid takes work items (image, pixel block)
    pid, pid + nprog, ... and accumulates sum g z and sum g over their pixels into part[pid] (2, C),
    which it alone writes (no atomics: the host sums part over programs)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    prow = part_ptr + pid.to(tl.int64) * 2 * C
    for wi in range(pid, total, nprog):
        img = wi // n_pt
        p = (wi % n_pt) * BP + tl.arange(0, BP)
        pm = p < HW
        base = img.to(tl.int64) * C * HW
        sbase = img.to(tl.int64) * 2 * HW
        mean = tl.load(stats_ptr + sbase + p, mask=pm, other=0.0)
        rstd = tl.load(stats_ptr + sbase + HW + p, mask=pm, other=0.0)
        a1 = mean * 0.0
        a2 = a1
        for c0 in range(0, C, BC):
            c = c0 + tl.arange(0, BC)
            cm = c < C
            m2 = cm[:, None] & pm[None, :]
            offs = base + c[:, None].to(tl.int64) * HW + p[None, :]
            gh = (tl.load(g_ptr + offs, mask=m2, other=0.0).to(mean.dtype)
                  * tl.load(w_ptr + c, mask=cm, other=0.0).to(mean.dtype)[:, None])
            z = _ln_z(tl.load(x_ptr + offs, mask=m2, other=0.0).to(mean.dtype), mean, rstd, NORM)
            a1 += tl.sum(gh, axis=0)
            a2 += tl.sum(gh * z, axis=0)
        a1 = a1 / C
        a2 = a2 / C
        for c0 in range(0, C, BC):
            c = c0 + tl.arange(0, BC)
            cm = c < C
            m2 = cm[:, None] & pm[None, :]
            offs = base + c[:, None].to(tl.int64) * HW + p[None, :]
            g = tl.load(g_ptr + offs, mask=m2, other=0.0).to(mean.dtype)
            x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(mean.dtype)
            gh = g * tl.load(w_ptr + c, mask=cm, other=0.0).to(mean.dtype)[:, None]
            xhat = (x - mean[None, :]) * rstd[None, :]
            gx = gh - xhat * a2[None, :]
            if NORM == 1:
                gx -= a1[None, :]
            tl.store(gx_ptr + offs, (rstd[None, :] * gx).to(gx_ptr.dtype.element_ty), mask=m2)
            seen = cm & (c * 0 + wi >= nprog)  # part[pid] holds earlier items' sums (not on the first item)
            pz = tl.load(prow + c, mask=seen, other=0.0) + tl.sum(g * _ln_z(x, mean, rstd, NORM), axis=1)
            tl.store(prow + c, pz, mask=cm)
            if NORM == 1:
                tl.store(prow + C + c, tl.load(prow + C + c, mask=seen, other=0.0) + tl.sum(g, axis=1), mask=cm)
        tl.debug_barrier()  # part[pid] written by every thread before the next item reads it


# ----------------------------------------------------------------------------- launchers and helpers
LN_BC, LN_BP = 32, 64


def _norm_mode(norm_bias: Optional[Tensor]) -> int:
    return 1 if norm_bias is not None else 2


def layer_norm_forward(x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], eps: float
                       ) -> Tuple[Tensor, Tensor]:
    """(LN(x) in x's dtype, stats (B, 2, H*W): mean and rstd per pixel, fp32 or fp64): one launch."""
    B, C, H, W = x.shape
    HW = H * W
    n = torch.empty_like(x)
    stats = torch.empty((B, 2, HW), dtype=accumulation_dtype(x.dtype), device=x.device)
    n_pt = cdiv(HW, LN_BP)
    _ln_fwd_kernel[(B * n_pt,)](x, norm_weight, norm_bias if norm_bias is not None else norm_weight, n, stats, C,
                                HW, n_pt, float(eps), NORM=_norm_mode(norm_bias), BC=LN_BC, BP=LN_BP,
                                F64=x.dtype == torch.float64, num_warps=4)
    return n, stats


def _as(acc: Tensor, like: Tensor) -> Tensor:
    """A fresh (poisonable) tensor shaped and typed like ``like`` holding ``acc``."""
    out = new_output(like.shape, like.dtype, like.device)
    out.copy_(acc.view(like.shape))
    return out


def layer_norm_backward(gn: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Optional[Tensor], stats: Tensor
                        ) -> List[Tensor]:
    """[grad_x, grad_norm_weight] (+ [grad_norm_bias] when WithBias), given gn = dL/dLN(x) and the
    stats of :func:`layer_norm_forward`: one launch, then one reduction of its partial sums per grad."""
    B, C, H, W = x.shape
    HW = H * W
    n_pt = cdiv(HW, LN_BP)
    total = B * n_pt
    nprog = max(1, min(total, xc._num_programs_cap(x.device)))
    gx = new_output(x.shape, x.dtype, x.device)
    part = torch.empty((nprog, 2, C), dtype=stats.dtype, device=x.device)
    _ln_bwd_kernel[(nprog,)](gn, x, norm_weight, stats, gx, part, C, HW, n_pt, total, NORM=_norm_mode(norm_bias),
                             BC=LN_BC, BP=LN_BP, F64=x.dtype == torch.float64, num_warps=4)
    params = [norm_weight] + ([norm_bias] if norm_bias is not None else [])
    return [gx] + [part[:, i].sum(0).to(p.dtype) for i, p in enumerate(params)]


def _chunk_offsets(B: int, chunks: int, device: torch.device) -> Tensor:
    """Row offsets [0, B, 2B, ..., chunks*B]: chunk e's rows are the B images (cached device table)."""
    return device_table([[e * B for e in range(chunks + 1)]], device)[0]


def pointwise_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor, chunks: int = 1,
                      residual: Optional[Tensor] = None, norm: xc.Norm = None) -> None:
    """out (chunks, B, C_out/chunks, H, W) = conv2d(x, weight, bias) chunked (+ residual), or of the
    LayerNorm of x (``norm``): one grouped _gemm_kernel launch, chunk e as expert e."""
    B, cin, H, W = x.shape
    HW, cp = H * W, weight.shape[0] // chunks
    # chunk e: weight rows e*cp.., output rows e*B + n, source row n (a base of -e*B rows)
    rows = [meta_row(GemmCol, C_IN=cin, C_OUT=cp, WEIGHT=e * cp * cin, WEIGHT_OUT_STRIDE=cin, WEIGHT_IN_STRIDE=1,
                     BIAS=e * cp, SRC=-e * B * cin * HW, SRC_ROW_STRIDE=cin * HW, OUT=0, OUT_ROW_STRIDE=cp * HW)
            for e in range(chunks)]
    xc.launch_gemm(x, weight, bias, out, _chunk_offsets(B, chunks, x.device), device_table(rows, x.device),
                   chunks * B, HW, cp, residual=residual, norm=norm)


def pointwise_backward(grad: Tensor, src: Tensor, weight: Tensor, has_bias: bool, chunks: int,
                       grad_src_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """For out = pointwise_forward(src, ...) (no norm) and grad = dL/dout: (grad_src in grad_src_dtype,
    grad_weight and grad_bias as fp32/fp64 accumulators). One weight-grad launch for all chunks,
    one 1x1 launch per chunk."""
    B, cin, H, W = src.shape
    HW, cout, dev = H * W, weight.shape[0], src.device
    cp, cdt = cout // chunks, accumulation_dtype(src.dtype)
    gw = torch.zeros((cout, cin), dtype=cdt, device=dev)
    gb = torch.zeros((cout,), dtype=cdt, device=dev) if has_bias else None
    rows = [meta_row(WgradCol, C_OUT=cp, C_IN=cin, GRAD_WEIGHT=e * cp * cin, G=0, G_ROW_STRIDE=cp * HW,
                     X=-e * B * cin * HW, X_ROW_STRIDE=cin * HW, GRAD_BIAS=e * cp) for e in range(chunks)]
    xc.launch_wgrad(grad, src, gw, gb, _chunk_offsets(B, chunks, dev), device_table(rows, dev), HW, cp, cin,
                    chunks * B)
    gsrc = new_output(src.shape, grad_src_dtype, dev)
    single = _chunk_offsets(B, 1, dev)
    for e in range(chunks):
        meta = device_table([driver.gemm_t_row(cp, cin, e * cp * cin, e * B * cp * HW, cp * HW, 0, cin * HW)], dev)
        xc.launch_gemm(grad, weight, None, gsrc, single, meta, B, HW, cin, accumulate=e > 0)
    return gsrc, gw, gb


# ----------------------------------------------------------------------------- the ops
class _LayerNormFirst(TritonExpertStage):
    """The Triton launchers, with a LayerNorm of the source folded into the fused pw->dw's 1x1."""

    def __init__(self, norm: xc.Norm):
        self.norm = norm

    def pwdw(self, *args, **kwargs) -> None:
        xc.launch_pwdw(*args, norm=self.norm, **kwargs)


def _ln_pwdw_forward(gated: bool, x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias, dw_bias, eps):
    kernels = _LayerNormFirst((norm_weight, norm_bias, eps))
    return driver.pwdw_forward(kernels, x, pw_weight, dw_weight, pw_bias, dw_bias, gated=gated)


def _ln_pwdw_backward(gated: bool, grad, x, norm_weight, norm_bias, pw_weight, dw_weight, pw_bias, dw_bias, eps):
    n, stats = layer_norm_forward(x, norm_weight, norm_bias, eps)
    gn, *conv = driver.pwdw_backward(KERNELS, grad, n, pw_weight, dw_weight, pw_bias, dw_bias, gated=gated)
    return layer_norm_backward(gn, x, norm_weight, norm_bias, stats) + conv


for _gated, _suffix in ((False, ""), (True, "_gated")):
    register("layer_norm_pointwise_depthwise_conv" + _suffix, "triton")(functools.partial(_ln_pwdw_forward, _gated))
    register("layer_norm_pointwise_depthwise_conv" + _suffix + "_backward", "triton")(
        functools.partial(_ln_pwdw_backward, _gated))


@register("layer_norm_pointwise_conv", "triton")
def _ln_pw(x, norm_weight, norm_bias, weight, bias, eps, chunks):
    B, _, H, W = x.shape
    out = new_output((chunks, B, weight.shape[0] // chunks, H, W), x.dtype, x.device)
    pointwise_forward(x, weight, bias, out, chunks, norm=(norm_weight, norm_bias, eps))
    return out


@register("layer_norm_pointwise_conv_backward", "triton")
def _ln_pw_backward(grad, x, norm_weight, norm_bias, weight, bias, eps, chunks):
    n, stats = layer_norm_forward(x, norm_weight, norm_bias, eps)
    gn, gw, gb = pointwise_backward(grad, n, weight, bias is not None, chunks, grad_dtype(x.dtype))
    out = layer_norm_backward(gn, x, norm_weight, norm_bias, stats) + [_as(gw, weight)]
    return out + ([_as(gb, bias)] if bias is not None else [])


@register("pointwise_conv", "triton")
def _pw(x, weight, bias, residual):
    B, _, H, W = x.shape
    out = new_output((B, weight.shape[0], H, W), x.dtype, x.device)
    pointwise_forward(x, weight, bias, out, residual=residual)
    return out


@register("pointwise_conv_backward", "triton")
def _pw_backward(grad, x, weight, bias):
    gx, gw, gb = pointwise_backward(grad, x, weight, bias is not None, 1, x.dtype)
    return [gx, _as(gw, weight)] + ([_as(gb, bias)] if bias is not None else [])
