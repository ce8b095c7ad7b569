"""Triton backend of the MoCE expert stage and of the plain pointwise->depthwise ops.

:class:`TritonExpertStage` implements the launchers of
:class:`moce_kernels.expert_stage.interface.ExpertStageKernels`: the grouped pw->dw / 1x1 /
weight-grad kernels of :mod:`.expert_conv`, the expert epilogue forward and backward and the
deterministic gather-sum (kernels below), and the window attention of each expert's rows
(:mod:`.window_attention`; for float64, which those kernels do not take, the reference's rows).
Importing this module registers ``pointwise_depthwise_conv(_gated)(_backward)`` and
``moe_experts(_backward)`` as backend ``triton``, for every floating dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import FLOAT_DTYPES, register_all
from ..expert_stage.implementations import conv_and_expert_implementations
from ..expert_stage.interface import ExpertStageKernels
from ..expert_stage.layouts import EpilogueCol
from ..reference import window_attention as reference_rows
from . import expert_conv as xc
from . import window_attention as wattn
from .expert_conv import _acc_zeros, _mm, _out_tile, _row_program
from ._host import cdiv

# The epilogue table's layout as Triton constexprs.
EP_RANK = tl.constexpr(int(EpilogueCol.RANK))
EP_PROJ_OUT = tl.constexpr(int(EpilogueCol.PROJ_OUT))
EP_PROJ_OUT_BIAS = tl.constexpr(int(EpilogueCol.PROJ_OUT_BIAS))
EP_PROJ1 = tl.constexpr(int(EpilogueCol.PROJ1))
EP_PROJ2 = tl.constexpr(int(EpilogueCol.PROJ2))
EP_ATTN = tl.constexpr(int(EpilogueCol.ATTN))


@triton.jit
def _sigmoid(u):
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _acc_1x1(acc, w_ptr, w_off, x_ptr, x_off, cin, HW, rs, rm, p, pm, BK: tl.constexpr, IEEE: tl.constexpr):
    """acc += W[rs, :cin] @ X[:cin, p] for W (., cin) at w_off and X (cin, HW) at x_off."""
    for k0 in range(0, cin, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < cin
        wt = tl.load(w_ptr + w_off + rs[:, None] * cin + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        xt = tl.load(x_ptr + x_off + ks[:, None].to(tl.int64) * HW + p[None, :], mask=km[:, None] & pm[None, :],
                     other=0.0)
        acc += _mm(wt, xt.to(wt.dtype), IEEE)
    return acc


@triton.jit
def _tu(a_ptr, sh_ptr, w_ptr, a_off, sh_off, r, C, HW, ow_off, ob_off, p1_off, rs, rm, p, pm,
        BR: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, IEEE: tl.constexpr, F64: tl.constexpr):
    """t = proj_out(attn) + proj_out_bias and u = proj1(shared) for output ranks ``rs``: two [BR, BP] tiles."""
    t = _acc_zeros(BR, BP, F64)
    u = _acc_1x1(t * 0.0, w_ptr, p1_off, sh_ptr, sh_off, C, HW, rs, rm, p, pm, BK, IEEE)
    t = _acc_1x1(t, w_ptr, ow_off, a_ptr, a_off, r, HW, rs, rm, p, pm, BK, IEEE)
    t += tl.load(w_ptr + ob_off + rs, mask=rm, other=0.0).to(t.dtype)[:, None]
    return t, u


@triton.jit
def _epilogue_row(offsets_ptr, meta_ptr, perm_ptr, kslots, HW, n_pt, E: tl.constexpr):
    """This program's row n, pixel tile, and the ``EpilogueCol`` entries of its expert: (n, tile, rank,
    proj_out, proj_out_bias, proj1 and proj2 offsets, the offset of row n's attention, n's image)."""
    n, pt, mrow = _row_program(offsets_ptr, meta_ptr, n_pt, E)
    r = tl.load(mrow + EP_RANK).to(tl.int32)
    a_off = tl.load(mrow + EP_ATTN) + n * r.to(tl.int64) * HW
    return (n, pt, r, tl.load(mrow + EP_PROJ_OUT), tl.load(mrow + EP_PROJ_OUT_BIAS), tl.load(mrow + EP_PROJ1),
            tl.load(mrow + EP_PROJ2), a_off, tl.load(perm_ptr + n) // kslots)


@triton.jit
def _epilogue_kernel(xs_ptr, sh_ptr, a_ptr, w_ptr, out_ptr, offsets_ptr, meta_ptr, perm_ptr, kslots, C, HW, n_pt,
                     E: tl.constexpr, XGATHER: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                     BP: tl.constexpr, IEEE: tl.constexpr, F64: tl.constexpr):
    """out[n] = xs[row] + proj2(t * silu(u)), t, u from _tu; row = image (XGATHER) or n."""
    n, pt, r, ow_off, ob_off, p1_off, p2_off, a_off, img = _epilogue_row(offsets_ptr, meta_ptr, perm_ptr, kslots, HW,
                                                                        n_pt, E)
    xrow = n.to(tl.int64)
    if XGATHER:
        xrow = img
    ch, cm, p, pm, acc = _out_tile(tl.program_id(1), C, pt, HW, BC, BP, F64)
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
def _epilogue_bwd_kernel(g_ptr, sh_ptr, a_ptr, w_ptr, gt_ptr, gu_ptr, h_ptr, offsets_ptr, meta_ptr, perm_ptr,
                         kslots, C, HW, n_pt, E: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr,
                         IEEE: tl.constexpr, F64: tl.constexpr):
    """Given G = dL/d out (rows), writes per expert rank block: gt = dL/dt, gu = dL/du and h = t*silu(u)
    (laid out like attn)."""
    n, pt, r, ow_off, ob_off, p1_off, p2_off, a_off, img = _epilogue_row(offsets_ptr, meta_ptr, perm_ptr, kslots, HW,
                                                                        n_pt, E)
    rb = tl.program_id(1)
    if rb * BR < r:
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


def launch_epilogue(xs, shared, attn, w, out, offsets, meta, perm, kslots: int, N: int, C: int, HW: int,
                    x_gather: bool, max_r: int) -> None:
    """``ExpertStageKernels.epilogue`` (``max_r`` sizes the CUDA launcher's shared memory; unused here)."""
    BC, BR, BK, BP = 32, 32, 32, 64
    n_pt = cdiv(HW, BP)
    _epilogue_kernel[(N * n_pt, cdiv(C, BC))](
        xs, shared, attn, w, out, offsets, meta, perm, kslots, C, HW, n_pt, E=meta.shape[0], XGATHER=x_gather,
        BC=BC, BR=BR, BK=BK, BP=BP, IEEE=_ieee(w), F64=_f64(w), num_warps=4)


def launch_epilogue_backward(g, shared, attn, w, gt, gu, h, offsets, meta, perm, kslots: int, N: int, C: int,
                             HW: int, max_r: int) -> None:
    """``ExpertStageKernels.epilogue_backward``."""
    BR, BK, BP = 32, 32, 64
    n_pt = cdiv(HW, BP)
    _epilogue_bwd_kernel[(N * n_pt, cdiv(max(max_r, 1), BR))](
        g, shared, attn, w, gt, gu, h, offsets, meta, perm, kslots, C, HW, n_pt, E=meta.shape[0], BR=BR, BK=BK,
        BP=BP, IEEE=_ieee(w, g), F64=_f64(w), num_warps=4)


def launch_gather_sum(src: torch.Tensor, inv: torch.Tensor, out: torch.Tensor, kslots: int) -> None:
    """``ExpertStageKernels.gather_sum``."""
    B = out.shape[0]
    L = out[0].numel()
    BL = 1024
    _gather_sum_kernel[(B, cdiv(L, BL))](src, inv, out, L, kslots, BL=BL, F64=_f64(out), num_warps=4)


def _attention_rows(q, *args) -> None:
    rows = reference_rows.window_attention_rows if q.dtype == torch.float64 else wattn.window_attention_rows
    rows(q, *args)


def _attention_rows_backward(grad, q, *args):
    rows_backward = (reference_rows.window_attention_rows_backward if q.dtype == torch.float64
                     else wattn.window_attention_rows_backward)
    return rows_backward(grad, q, *args)


class TritonExpertStage(ExpertStageKernels):
    """The Triton launchers (signatures and semantics: :class:`ExpertStageKernels`)."""
    pwdw = staticmethod(xc.launch_pwdw)
    pwdw_backward = staticmethod(xc.launch_pwdw_backward)
    gemm = staticmethod(xc.launch_gemm)
    wgrad = staticmethod(xc.launch_wgrad)
    epilogue = staticmethod(launch_epilogue)
    epilogue_backward = staticmethod(launch_epilogue_backward)
    gather_sum = staticmethod(launch_gather_sum)
    attention_rows = staticmethod(_attention_rows)
    attention_rows_backward = staticmethod(_attention_rows_backward)


KERNELS = TritonExpertStage()
register_all("triton", conv_and_expert_implementations(KERNELS), dtypes=FLOAT_DTYPES)
