"""Triton backend of the MoCE expert stage (``moe_experts`` and its backward), sync-free.

The stage driver (buffer layout, which launch does what) is backend-agnostic and lives in
:mod:`moce_kernels.ops.grouped_conv`; this module supplies the Triton kernels it launches:
the grouped pw->dw / 1x1 / weight-grad kernels of :mod:`.expert_conv`, plus the fused expert
epilogue (``out = x + pw_2((pw_o(attn) + b_o) * silu(pw_1(shared)))``) forward and backward, and
a deterministic gather-sum of rows back to images. The window attention of each expert's
segment is another family's kernel (``window_attention_rows``), one launch per expert.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import register
from ..ops import grouped_conv as driver
from . import expert_conv as xc
from .expert_conv import _expert_of, _mm


@triton.jit
def _sigmoid(u):
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _tu(a_ptr, sh_ptr, w_ptr, a_off, sh_off, r, C, HW, ow_off, ob_off, p1_off, rs, rm, p, pm,
        BR: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, IEEE: tl.constexpr, F64: tl.constexpr):
    """t = pw_o(attn) + b_o and u = pw_1(shared) for output ranks ``rs``: two [BR, BP] tiles."""
    if F64:
        t = tl.zeros([BR, BP], dtype=tl.float64)
    else:
        t = tl.zeros([BR, BP], dtype=tl.float32)
    u = t * 0.0
    for k0 in range(0, r, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < r
        wt = tl.load(w_ptr + ow_off + rs[:, None] * r + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        at = tl.load(a_ptr + a_off + ks[:, None].to(tl.int64) * HW + p[None, :], mask=km[:, None] & pm[None, :],
                     other=0.0)
        t += _mm(wt, at.to(wt.dtype), IEEE)
    for k0 in range(0, C, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < C
        wt = tl.load(w_ptr + p1_off + rs[:, None] * C + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        st = tl.load(sh_ptr + sh_off + ks[:, None].to(tl.int64) * HW + p[None, :], mask=km[:, None] & pm[None, :],
                     other=0.0)
        u += _mm(wt, st.to(wt.dtype), IEEE)
    t += tl.load(w_ptr + ob_off + rs, mask=rm, other=0.0).to(t.dtype)[:, None]
    return t, u


@triton.jit
def _final_fwd_kernel(xs_ptr, sh_ptr, a_ptr, w_ptr, out_ptr, offsets_ptr, meta_ptr, perm_ptr, kslots, C, HW, n_pt,
                      E: tl.constexpr, XGATHER: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                      BP: tl.constexpr, IEEE: tl.constexpr, F64: tl.constexpr):
    """out[n] = xs[row] + pw_2(t * silu(u)), t, u from _tu; row = image (XGATHER) or n."""
    pid0 = tl.program_id(0)
    cb = tl.program_id(1)
    n = pid0 // n_pt
    pt = pid0 % n_pt
    e = _expert_of(offsets_ptr, n, E)
    mrow = meta_ptr + e * 16
    r = tl.load(mrow + 0).to(tl.int32)
    ow_off = tl.load(mrow + 1)
    ob_off = tl.load(mrow + 2)
    p1_off = tl.load(mrow + 3)
    p2_off = tl.load(mrow + 4)
    a_off = tl.load(mrow + 5) + n * r.to(tl.int64) * HW
    img = tl.load(perm_ptr + n) // kslots
    xrow = n.to(tl.int64)
    if XGATHER:
        xrow = img
    ch = cb * BC + tl.arange(0, BC)
    cm = ch < C
    p = pt * BP + tl.arange(0, BP)
    pm = p < HW
    if F64:
        acc = tl.zeros([BC, BP], dtype=tl.float64)
    else:
        acc = tl.zeros([BC, BP], dtype=tl.float32)
    for r0 in range(0, r, BR):
        rs = r0 + tl.arange(0, BR)
        rm = rs < r
        t, u = _tu(a_ptr, sh_ptr, w_ptr, a_off, img * C * HW, r, C, HW, ow_off, ob_off, p1_off, rs, rm, p, pm,
                   BR, BK, BP, IEEE, F64)
        h = t * u * _sigmoid(u)
        p2t = tl.load(w_ptr + p2_off + ch[:, None] * r + rs[None, :], mask=cm[:, None] & rm[None, :], other=0.0)
        acc += _mm(p2t, h.to(p2t.dtype), IEEE)
    m2 = cm[:, None] & pm[None, :]
    offs = ch[:, None].to(tl.int64) * HW + p[None, :]
    acc += tl.load(xs_ptr + xrow * C * HW + offs, mask=m2, other=0.0).to(acc.dtype)
    tl.store(out_ptr + n.to(tl.int64) * C * HW + offs, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _final_bwd_kernel(g_ptr, sh_ptr, a_ptr, w_ptr, gt_ptr, gu_ptr, h_ptr, offsets_ptr, meta_ptr, perm_ptr, kslots,
                      C, HW, n_pt, E: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
                      IEEE: tl.constexpr, F64: tl.constexpr):
    """Given G = dL/d out (rows), writes per expert rank block: gt = dL/dt, gu = dL/du and h = t*silu(u)
    (laid out like attn)."""
    pid0 = tl.program_id(0)
    rb = tl.program_id(1)
    n = pid0 // n_pt
    pt = pid0 % n_pt
    e = _expert_of(offsets_ptr, n, E)
    mrow = meta_ptr + e * 16
    r = tl.load(mrow + 0).to(tl.int32)
    if rb * BR < r:
        ow_off = tl.load(mrow + 1)
        ob_off = tl.load(mrow + 2)
        p1_off = tl.load(mrow + 3)
        p2_off = tl.load(mrow + 4)
        a_off = tl.load(mrow + 5) + n * r.to(tl.int64) * HW
        img = tl.load(perm_ptr + n) // kslots
        rs = rb * BR + tl.arange(0, BR)
        rm = rs < r
        p = pt * BP + tl.arange(0, BP)
        pm = p < HW
        t, u = _tu(a_ptr, sh_ptr, w_ptr, a_off, img * C * HW, r, C, HW, ow_off, ob_off, p1_off, rs, rm, p, pm,
                   BR, BK, BP, IEEE, F64)
        gh = t * 0.0
        for c0 in range(0, C, BK):
            cs = c0 + tl.arange(0, BK)
            csm = cs < C
            p2t = tl.load(w_ptr + p2_off + cs[None, :] * r + rs[:, None], mask=rm[:, None] & csm[None, :], other=0.0)
            gt_ = tl.load(g_ptr + n.to(tl.int64) * C * HW + cs[:, None].to(tl.int64) * HW + p[None, :],
                          mask=csm[:, None] & pm[None, :], other=0.0)
            if IEEE:
                gh += _mm(p2t.to(gh.dtype), gt_.to(gh.dtype), True)
            else:
                gh += _mm(p2t, gt_.to(p2t.dtype), False)
        s = _sigmoid(u)
        sil = u * s
        m2 = rm[:, None] & pm[None, :]
        offs = a_off + rs[:, None].to(tl.int64) * HW + p[None, :]
        dt = gt_ptr.dtype.element_ty
        tl.store(gt_ptr + offs, (gh * sil).to(dt), mask=m2)
        tl.store(gu_ptr + offs, (gh * t * s * (1.0 + u * (1.0 - s))).to(dt), mask=m2)
        tl.store(h_ptr + offs, (t * sil).to(dt), mask=m2)


@triton.jit
def _gather_sum_kernel(src_ptr, inv_ptr, out_ptr, L, kslots, BL: tl.constexpr, F64: tl.constexpr):
    """out[b, l] = sum_j src[inv[b*k + j], l], j in slot order (deterministic)."""
    b = tl.program_id(0)
    lb = tl.program_id(1)
    offs = lb * BL + tl.arange(0, BL)
    m = offs < L
    if F64:
        acc = tl.zeros([BL], dtype=tl.float64)
    else:
        acc = tl.zeros([BL], dtype=tl.float32)
    for j in range(0, kslots):
        row = tl.load(inv_ptr + b * kslots + j)
        acc += tl.load(src_ptr + row * L + offs, mask=m, other=0.0).to(acc.dtype)
    tl.store(out_ptr + b.to(tl.int64) * L + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def _f64(*ts: torch.Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in ts)


def _ieee(*ts: torch.Tensor) -> bool:
    return any(t.dtype in (torch.float32, torch.float64) for t in ts)


def launch_final_fwd(xs, shared, attn, w, out, offsets, meta, perm, kslots: int, N: int, C: int, HW: int,
                     x_gather: bool, max_r: int) -> None:  # max_r: the CUDA launcher's (sizes its shared memory)
    BC, BR, BK, BP = 32, 32, 32, 64
    n_pt = triton.cdiv(HW, BP)
    _final_fwd_kernel[(N * n_pt, triton.cdiv(C, BC))](
        xs, shared, attn, w, out, offsets, meta, perm, kslots, C, HW, n_pt, E=meta.shape[0], XGATHER=x_gather,
        BC=BC, BR=BR, BK=BK, BP=BP, IEEE=_ieee(w), F64=_f64(w), num_warps=4)


def launch_final_bwd(g, shared, attn, w, gt, gu, h, offsets, meta, perm, kslots: int, N: int, C: int, HW: int,
                     max_r: int) -> None:
    BR, BK, BP = 32, 32, 64
    n_pt = triton.cdiv(HW, BP)
    _final_bwd_kernel[(N * n_pt, triton.cdiv(max(max_r, 1), BR))](
        g, shared, attn, w, gt, gu, h, offsets, meta, perm, kslots, C, HW, n_pt, E=meta.shape[0], BR=BR, BK=BK,
        BP=BP, IEEE=_ieee(w, g), F64=_f64(w), num_warps=4)


def launch_gather_sum(src: torch.Tensor, inv: torch.Tensor, out: torch.Tensor, kslots: int) -> None:
    B = out.shape[0]
    L = out[0].numel()
    BL = 1024
    _gather_sum_kernel[(B, triton.cdiv(L, BL))](src, inv, out, L, kslots, BL=BL, F64=_f64(out), num_warps=4)


def _attention_api():
    """The window-attention family's sync-free per-segment kernels (moce_kernels/triton/window_attention.py);
    float64, which those kernels do not take, uses the reference version."""
    from ..reference import grouped_conv as standin
    from .window_attention import window_attention_rows as fwd, window_attention_rows_backward as bwd

    def rows_fwd(q, *args):
        return (standin.window_attention_rows if q.dtype == torch.float64 else fwd)(q, *args)

    def rows_bwd(grad, q, *args):
        return (standin.window_attention_rows_backward if q.dtype == torch.float64 else bwd)(grad, q, *args)

    return rows_fwd, rows_bwd


KERNELS = driver.Kernels(
    pwdw=xc.launch_pwdw, pwdw_bwd=xc.launch_pwdw_bwd, gemm=xc.launch_gemm, wgrad=xc.launch_wgrad,
    final_fwd=launch_final_fwd, final_bwd=launch_final_bwd, gather_sum=launch_gather_sum, attention=_attention_api)


@register("moe_experts", "triton")
def _experts(x, shared, perm, offsets, k, weights, windows, depths):
    return driver.experts_forward(KERNELS, x, shared, perm, offsets, k, weights, windows, depths)


@register("moe_experts_backward", "triton")
def _experts_backward(grad, x, shared, perm, offsets, k, weights, windows, depths):
    return driver.experts_backward(KERNELS, grad, x, shared, perm, offsets, k, weights, windows, depths)
