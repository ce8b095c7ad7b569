"""Triton kernels of the expert stage's grouped convolutions, and their launchers.

Every kernel here is *grouped*: rows ``n`` of the batch belong to expert ``e`` with
``offsets[e] <= n < offsets[e+1]`` (device tensor, read on the device), and each expert has its
own channel counts, weight offsets into packed weight buffers and buffer bases, given by an int64
``meta`` table (E, META_ROW_WIDTH) built by the driver (:mod:`moce_kernels.expert_stage.driver`)
in the layouts of :mod:`moce_kernels.expert_stage.layouts`, read here through the ``tl.constexpr``
column indices below. The plain pointwise->depthwise ops are the case E = 1.

Kernels:
  _pwdw_kernel     fused 1x1 -> depthwise k x k (modes ``PwDwMode``: plain forward, GELU-gated
                   forward, gated backward-epilogue) with the 1x1 result for the tile and its halo
                   kept in a small per-program scratch slot (persistent grid: the slots stay in L1/L2)
  _pwdw_bwd_kernel backward core: recompute the 1x1 halo, grad wrt the 1x1 output (gy),
                   grad of the depthwise weight and bias (atomics)
  _gemm_kernel     grouped 1x1: Y = W_e @ X (+ bias) (+ Y or a residual R), optional row gather
  _wgrad_kernel    grouped weight grad: dW_e += sum_{rows of e, pixels} G X^T (+ bias grad), atomics
The expert epilogue and the gather-sum are in :mod:`.expert_stage`. The 1x1 stages of _pwdw_kernel
(_halo_pw) and of _gemm_kernel can apply a LayerNorm over the source's channels first (constexpr NORM,
folded into the product by _ln_fold_step; used by :mod:`.norm_conv`).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backends import triton_interpreted
from ..settings import SETTINGS
from ..expert_stage.layouts import META_ROW_WIDTH, GemmCol, PwDwCol, PwDwMode, WgradCol
from ._host import cdiv

# The meta tables' layouts as Triton constexprs (Triton kernels read module globals only as constexprs).
META_ROW = tl.constexpr(META_ROW_WIDTH)
PD_C_IN = tl.constexpr(int(PwDwCol.C_IN))
PD_C_OUT = tl.constexpr(int(PwDwCol.C_OUT))
PD_PW_WEIGHT = tl.constexpr(int(PwDwCol.PW_WEIGHT))
PD_DW_WEIGHT = tl.constexpr(int(PwDwCol.DW_WEIGHT))
PD_PW_BIAS = tl.constexpr(int(PwDwCol.PW_BIAS))
PD_DW_BIAS = tl.constexpr(int(PwDwCol.DW_BIAS))
PD_SRC = tl.constexpr(int(PwDwCol.SRC))
PD_SRC_ROW_STRIDE = tl.constexpr(int(PwDwCol.SRC_ROW_STRIDE))
PD_OUT = tl.constexpr(int(PwDwCol.OUT))
PD_OUT_SPLIT = tl.constexpr(int(PwDwCol.OUT_SPLIT))
PD_OUT_SPLIT_STRIDE = tl.constexpr(int(PwDwCol.OUT_SPLIT_STRIDE))
PD_OUT_ROW_STRIDE = tl.constexpr(int(PwDwCol.OUT_ROW_STRIDE))
PD_GRAD_PW = tl.constexpr(int(PwDwCol.GRAD_PW))
PD_GRAD_PW_ROW_STRIDE = tl.constexpr(int(PwDwCol.GRAD_PW_ROW_STRIDE))
MM_C_IN = tl.constexpr(int(GemmCol.C_IN))
MM_C_OUT = tl.constexpr(int(GemmCol.C_OUT))
MM_WEIGHT = tl.constexpr(int(GemmCol.WEIGHT))
MM_WEIGHT_OUT_STRIDE = tl.constexpr(int(GemmCol.WEIGHT_OUT_STRIDE))
MM_WEIGHT_IN_STRIDE = tl.constexpr(int(GemmCol.WEIGHT_IN_STRIDE))
MM_BIAS = tl.constexpr(int(GemmCol.BIAS))
MM_SRC = tl.constexpr(int(GemmCol.SRC))
MM_SRC_ROW_STRIDE = tl.constexpr(int(GemmCol.SRC_ROW_STRIDE))
MM_OUT = tl.constexpr(int(GemmCol.OUT))
MM_OUT_ROW_STRIDE = tl.constexpr(int(GemmCol.OUT_ROW_STRIDE))
WG_C_OUT = tl.constexpr(int(WgradCol.C_OUT))
WG_C_IN = tl.constexpr(int(WgradCol.C_IN))
WG_GRAD_WEIGHT = tl.constexpr(int(WgradCol.GRAD_WEIGHT))
WG_G = tl.constexpr(int(WgradCol.G))
WG_G_ROW_STRIDE = tl.constexpr(int(WgradCol.G_ROW_STRIDE))
WG_X = tl.constexpr(int(WgradCol.X))
WG_X_ROW_STRIDE = tl.constexpr(int(WgradCol.X_ROW_STRIDE))
WG_GRAD_BIAS = tl.constexpr(int(WgradCol.GRAD_BIAS))
MODE_PLAIN = tl.constexpr(int(PwDwMode.PLAIN))
MODE_GATED = tl.constexpr(int(PwDwMode.GATED))


def _num_programs_cap(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 16


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ieee(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _expert_of(offsets_ptr, n, E: tl.constexpr):
    """Expert owning row n: number of i in [1, E) with offsets[i] <= n."""
    e = n * 0
    for i in tl.static_range(1, E):
        e += (tl.load(offsets_ptr + i) <= n).to(e.dtype)
    return e


@triton.jit
def _src_offset(mrow, perm_ptr, n, kslots, GATHER: tl.constexpr, SRC: tl.constexpr, SRC_ROW_STRIDE: tl.constexpr):
    """Offset of row n's source image: meta[SRC] + srow * meta[SRC_ROW_STRIDE], srow = perm[n] // kslots
    if GATHER else n."""
    srow = n.to(tl.int64)
    if GATHER:
        srow = tl.load(perm_ptr + n) // kslots
    return tl.load(mrow + SRC) + srow * tl.load(mrow + SRC_ROW_STRIDE)


# Triton 3.9's interpreter computes bf16 tl.dot wrongly; there (only) bf16 operands go through fp32.
_INTERP_BF16_FIX = tl.constexpr(triton_interpreted())


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        if _INTERP_BF16_FIX:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b)


@triton.jit
def _gelu(a):
    return 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))


@triton.jit
def _gelu_grad(a):
    cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
    pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327
    return cdf + a * pdf


@triton.jit
def _ln_fold_init(src_ptr, pix, pmask, acc):
    """The fold's state for the pixels ``pix`` of one source row (src_ptr at its channel 0) and an
    accumulator tile acc [BC, BP]: the shift (the pixels' channel-0 values) and zero sums s1, s2 [BP],
    u, v [BC] (see _ln_fold_step), in acc's dtype."""
    shift = tl.load(src_ptr + pix, mask=pmask, other=0.0).to(acc.dtype)
    s1 = tl.zeros([acc.shape[1]], dtype=acc.dtype)
    u = tl.zeros([acc.shape[0]], dtype=acc.dtype)
    return shift, s1, s1, u, u


@triton.jit
def _ln_fold_step(xt, wt, xmask, shift, nw_ptr, nb_ptr, ks, km, s1, s2, u, v, NORM: tl.constexpr):
    """One K step of ``pw(LN(x))`` with the LayerNorm folded into the 1x1 (NORM 1: WithBias, 2: BiasFree).
    Takes the x tile [BK, BP] and the weight tile [BC, BK]; returns the product's operands
    ``W diag(gamma)`` (in the weight's dtype) and ``x - shift`` (the pixel's channel-0 value subtracted,
    so that the sums below do not cancel when |mean| >> std), and the running sums: s1, s2 [BP] of
    ``x - shift`` and its square; u [BC] of ``W diag(gamma)`` (as rounded for the product); v [BC] of
    ``W beta``. All sums in s1's dtype (fp32, or fp64)."""
    xs = tl.where(xmask, xt.to(s1.dtype) - shift[None, :], 0.0)
    s1 += tl.sum(xs, axis=0)
    s2 += tl.sum(xs * xs, axis=0)
    wf = wt.to(s1.dtype)
    wg = (wf * tl.load(nw_ptr + ks, mask=km, other=0.0).to(s1.dtype)[None, :]).to(wt.dtype)
    u += tl.sum(wg.to(s1.dtype), axis=1)
    if NORM == 1:
        v += tl.sum(wf * tl.load(nb_ptr + ks, mask=km, other=0.0).to(s1.dtype)[None, :], axis=1)
    return wg, xs, s1, s2, u, v


@triton.jit
def _ln_fold_finish(acc, s1, s2, u, v, shift, cin, eps, NORM: tl.constexpr):
    """acc = sum_k W[c, k] gamma[k] (x[k] - shift) [BC, BP] -> ``pw(LN(x))`` without the conv's bias:
    WithBias ``rstd (acc - m u) + v``, BiasFree ``rstd (acc + shift u)``, where m = mean(x) - shift,
    var = mean((x - shift)^2) - m^2 (the shifted sums of _ln_fold_step), rstd = 1 / sqrt(var + eps)."""
    m = s1 / cin
    rstd = 1.0 / tl.sqrt(tl.maximum(s2 / cin - m * m, 0.0) + eps)
    if NORM == 1:
        return rstd[None, :] * (acc - u[:, None] * m[None, :]) + v[:, None]
    else:
        return rstd[None, :] * (acc + u[:, None] * shift[None, :])


@triton.jit
def _halo_pw(src_ptr, w_ptr, pb_ptr, nw_ptr, nb_ptr, slot_ptr, src_off, cin, w_off, pb_off, ch, cmask, ty0, tx0,
             H, W, eps, HAS_PB: tl.constexpr, NORM: tl.constexpr, K: tl.constexpr, TH: tl.constexpr,
             TW: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BHC: tl.constexpr, HSTRIDE: tl.constexpr,
             IEEE: tl.constexpr):
    """1x1 conv (rows ``ch`` of the packed weight) over the tile + halo; zero outside the image
    (the depthwise conv pads the 1x1 *output* with zeros); stored to slot[BC, HSTRIDE]. NORM > 0: of
    the LayerNorm of src over its cin channels (weight nw, bias nb; 1 WithBias, 2 BiasFree), folded
    into the product (_ln_fold_step)."""
    P: tl.constexpr = K // 2
    HWD: tl.constexpr = TW + K - 1
    HALO: tl.constexpr = (TH + K - 1) * HWD
    HW = H * W
    rc = tl.arange(0, BC)
    for j0 in range(0, HALO, BHC):
        j = j0 + tl.arange(0, BHC)
        iy = ty0 - P + j // HWD
        ix = tx0 - P + j % HWD
        pv = (j < HALO) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        pix = iy * W + ix
        acc = tl.zeros([BC, BHC], dtype=slot_ptr.dtype.element_ty)
        if NORM > 0:
            shift, s1, s2, u, v = _ln_fold_init(src_ptr + src_off, pix, pv, acc)
        for k0 in range(0, cin, BK):
            ks = k0 + tl.arange(0, BK)
            km = ks < cin
            xt = tl.load(src_ptr + src_off + ks[:, None].to(tl.int64) * HW + pix[None, :],
                         mask=km[:, None] & pv[None, :], other=0.0)
            wt = tl.load(w_ptr + w_off + ch[:, None] * cin + ks[None, :], mask=cmask[:, None] & km[None, :],
                         other=0.0)
            if NORM > 0:
                wt, xt, s1, s2, u, v = _ln_fold_step(xt, wt, km[:, None] & pv[None, :], shift, nw_ptr, nb_ptr, ks, km,
                                                     s1, s2, u, v, NORM)
            acc += _mm(wt, xt.to(wt.dtype), IEEE)
        if NORM > 0:
            acc = _ln_fold_finish(acc, s1, s2, u, v, shift, cin, eps, NORM)
        if HAS_PB:
            acc += tl.load(pb_ptr + pb_off + ch, mask=cmask, other=0.0).to(acc.dtype)[:, None]
        acc = tl.where(pv[None, :], acc, 0.0)
        tl.store(slot_ptr + rc[:, None] * HSTRIDE + j[None, :], acc)


@triton.jit
def _dw_from_slot(slot_ptr, dw_ptr, dw_off, ch, cmask, oy, ox, valid, K: tl.constexpr, TW: tl.constexpr,
                  BC: tl.constexpr, BP: tl.constexpr, HSTRIDE: tl.constexpr):
    """Depthwise k x k over the halo tile in the slot: [BC, BP] (no bias)."""
    HWD: tl.constexpr = TW + K - 1
    rc = tl.arange(0, BC)
    acc = tl.zeros([BC, BP], dtype=slot_ptr.dtype.element_ty)
    for t in range(K * K):
        v = tl.load(slot_ptr + rc[:, None] * HSTRIDE + ((oy + t // K) * HWD + ox + t % K)[None, :],
                    mask=valid[None, :], other=0.0)
        wv = tl.load(dw_ptr + dw_off + ch * (K * K) + t, mask=cmask, other=0.0).to(acc.dtype)
        acc += wv[:, None] * v
    return acc


# ----------------------------------------------------------------------------- fused pw -> dw
@triton.jit
def _work_item(wi, n_cblk, n_tiles, n_tw, offsets_ptr, meta_ptr, E: tl.constexpr, TH: tl.constexpr,
               TW: tl.constexpr):
    """Work item ``wi`` of the persistent pw->dw grids: (row n, its meta row, channel block, tile origin y, x)."""
    cb = wi % n_cblk
    rest = wi // n_cblk
    tile = rest % n_tiles
    n = rest // n_tiles
    mrow = meta_ptr + _expert_of(offsets_ptr, n, E) * META_ROW
    return n, mrow, cb, (tile // n_tw) * TH, (tile % n_tw) * TW


@triton.jit
def _pwdw_out_offset(mrow, n, ch, HW):
    """Offset of output channel ``ch`` of row n (``PwDwCol``: block ch // OUT_SPLIT, channel ch % OUT_SPLIT)."""
    osplit = tl.load(mrow + PD_OUT_SPLIT)
    return (tl.load(mrow + PD_OUT) + (ch // osplit) * tl.load(mrow + PD_OUT_SPLIT_STRIDE)
            + n * tl.load(mrow + PD_OUT_ROW_STRIDE) + (ch % osplit) * HW)


@triton.jit
def _pwdw_kernel(src_ptr, w_ptr, dw_ptr, pb_ptr, db_ptr, out_ptr, g_ptr, gofull_ptr, scratch_ptr, offsets_ptr,
                 meta_ptr, perm_ptr, nw_ptr, nb_ptr, kslots, H, W, n_tw, n_tiles, n_cblk, total, eps,
                 E: tl.constexpr, MODE: tl.constexpr, GATHER: tl.constexpr, HAS_PB: tl.constexpr,
                 HAS_DB: tl.constexpr, NORM: tl.constexpr, K: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                 BC: tl.constexpr, BK: tl.constexpr, BHC: tl.constexpr, BP: tl.constexpr, HSTRIDE: tl.constexpr,
                 IEEE: tl.constexpr):
    """MODE (``PwDwMode``) PLAIN: out = dw(pw(src)) (+biases); GATED: out = gelu(a) * b (a, b the channel
    halves); GATED_BACKWARD: gofull = d(gelu(a)*b)/d(a, b) * g, full C_out channels. NORM > 0: pw of the
    LayerNorm of src (see _halo_pw)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    NB: tl.constexpr = 1 if MODE == MODE_PLAIN else 2
    slot = scratch_ptr + pid.to(tl.int64) * (NB * BC * HSTRIDE)
    HW = H * W
    i = tl.arange(0, BP)
    oy = i // TW
    ox = i % TW
    ivalid = i < TH * TW
    for wi in range(pid, total, nprog):
        n, mrow, cb, ty0, tx0 = _work_item(wi, n_cblk, n_tiles, n_tw, offsets_ptr, meta_ptr, E, TH, TW)
        cin = tl.load(mrow + PD_C_IN).to(tl.int32)
        cout = tl.load(mrow + PD_C_OUT).to(tl.int32)
        nch = cout // NB
        if cb * BC < nch:
            w_off = tl.load(mrow + PD_PW_WEIGHT)
            dw_off = tl.load(mrow + PD_DW_WEIGHT)
            pb_off = tl.load(mrow + PD_PW_BIAS)
            db_off = tl.load(mrow + PD_DW_BIAS)
            src_off = _src_offset(mrow, perm_ptr, n, kslots, GATHER, PD_SRC, PD_SRC_ROW_STRIDE)
            ch = cb * BC + tl.arange(0, BC)
            cmask = ch < nch
            _halo_pw(src_ptr, w_ptr, pb_ptr, nw_ptr, nb_ptr, slot, src_off, cin, w_off, pb_off, ch, cmask, ty0, tx0,
                     H, W, eps, HAS_PB, NORM, K, TH, TW, BC, BK, BHC, HSTRIDE, IEEE)
            if MODE != MODE_PLAIN:
                _halo_pw(src_ptr, w_ptr, pb_ptr, nw_ptr, nb_ptr, slot + BC * HSTRIDE, src_off, cin, w_off, pb_off,
                         ch + nch, cmask, ty0, tx0, H, W, eps, HAS_PB, NORM, K, TH, TW, BC, BK, BHC, HSTRIDE, IEEE)
            tl.debug_barrier()
            py = ty0 + oy
            px = tx0 + ox
            pm = ivalid & (py < H) & (px < W)
            pix = py * W + px
            m2 = cmask[:, None] & pm[None, :]
            a = _dw_from_slot(slot, dw_ptr, dw_off, ch, cmask, oy, ox, ivalid, K, TW, BC, BP, HSTRIDE)
            if HAS_DB:
                a += tl.load(db_ptr + db_off + ch, mask=cmask, other=0.0).to(a.dtype)[:, None]
            o_off = _pwdw_out_offset(mrow, n, ch, HW)
            optrs = o_off[:, None] + pix[None, :]
            if MODE == MODE_PLAIN:
                tl.store(out_ptr + optrs, a.to(out_ptr.dtype.element_ty), mask=m2)
            else:
                b = _dw_from_slot(slot + BC * HSTRIDE, dw_ptr, dw_off, ch + nch, cmask, oy, ox, ivalid, K, TW, BC,
                                  BP, HSTRIDE)
                if HAS_DB:
                    b += tl.load(db_ptr + db_off + ch + nch, mask=cmask, other=0.0).to(b.dtype)[:, None]
                if MODE == MODE_GATED:
                    tl.store(out_ptr + optrs, (_gelu(a) * b).to(out_ptr.dtype.element_ty), mask=m2)
                else:
                    g = tl.load(g_ptr + optrs, mask=m2, other=0.0).to(a.dtype)
                    gbase = (n * cout + ch).to(tl.int64) * HW
                    gdt = gofull_ptr.dtype.element_ty
                    tl.store(gofull_ptr + gbase[:, None] + pix[None, :], (g * b * _gelu_grad(a)).to(gdt), mask=m2)
                    tl.store(gofull_ptr + gbase[:, None] + nch * HW + pix[None, :], (g * _gelu(a)).to(gdt),
                             mask=m2)
            tl.debug_barrier()


@triton.jit
def _pwdw_bwd_kernel(src_ptr, w_ptr, dw_ptr, pb_ptr, go_ptr, gy_ptr, gdw_ptr, gdb_ptr, scratch_ptr, offsets_ptr,
                     meta_ptr, perm_ptr, kslots, H, W, n_tw, n_tiles, n_cblk, total,
                     E: tl.constexpr, GATHER: tl.constexpr, HAS_PB: tl.constexpr, HAS_DB: tl.constexpr,
                     K: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     BHC: tl.constexpr, BP: tl.constexpr, HSTRIDE: tl.constexpr, IEEE: tl.constexpr):
    """Given go = dL/d(dw output) (laid out like the forward output), writes gy = dL/d(pw output)
    (float32/64, row stride from meta) and accumulates grad dw weight / dw bias (atomics)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    slot = scratch_ptr + pid.to(tl.int64) * (BC * HSTRIDE)
    P: tl.constexpr = K // 2
    HWD: tl.constexpr = TW + K - 1
    HW = H * W
    i = tl.arange(0, BP)
    oy = i // TW
    ox = i % TW
    ivalid = i < TH * TW
    rc = tl.arange(0, BC)
    for wi in range(pid, total, nprog):
        n, mrow, cb, ty0, tx0 = _work_item(wi, n_cblk, n_tiles, n_tw, offsets_ptr, meta_ptr, E, TH, TW)
        cin = tl.load(mrow + PD_C_IN).to(tl.int32)
        cout = tl.load(mrow + PD_C_OUT).to(tl.int32)
        if cb * BC < cout:
            dw_off = tl.load(mrow + PD_DW_WEIGHT)
            db_off = tl.load(mrow + PD_DW_BIAS)
            src_off = _src_offset(mrow, perm_ptr, n, kslots, GATHER, PD_SRC, PD_SRC_ROW_STRIDE)
            ch = cb * BC + rc
            cmask = ch < cout
            _halo_pw(src_ptr, w_ptr, pb_ptr, w_ptr, w_ptr, slot, src_off, cin, tl.load(mrow + PD_PW_WEIGHT),
                     tl.load(mrow + PD_PW_BIAS), ch, cmask, ty0, tx0, H, W, 0.0, HAS_PB, 0, K, TH, TW, BC, BK, BHC,
                     HSTRIDE, IEEE)
            tl.debug_barrier()
            py = ty0 + oy
            px = tx0 + ox
            pm = ivalid & (py < H) & (px < W)
            o_off = _pwdw_out_offset(mrow, n, ch, HW)
            go = tl.load(go_ptr + o_off[:, None] + (py * W + px)[None, :], mask=cmask[:, None] & pm[None, :],
                         other=0.0).to(slot.dtype.element_ty)
            if HAS_DB:
                tl.atomic_add(gdb_ptr + db_off + ch, tl.sum(go, axis=1), mask=cmask)
            gy = tl.zeros([BC, BP], dtype=slot.dtype.element_ty)
            for t in range(K * K):
                dy = t // K
                dx = t % K
                ysh = tl.load(slot + rc[:, None] * HSTRIDE + ((oy + dy) * HWD + ox + dx)[None, :],
                              mask=ivalid[None, :], other=0.0)
                tl.atomic_add(gdw_ptr + dw_off + ch * (K * K) + t, tl.sum(go * ysh, axis=1), mask=cmask)
                sy = py - dy + P
                sx = px - dx + P
                sm = pm & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
                gsh = tl.load(go_ptr + o_off[:, None] + (sy * W + sx)[None, :], mask=cmask[:, None] & sm[None, :],
                              other=0.0).to(gy.dtype)
                wv = tl.load(dw_ptr + dw_off + ch * (K * K) + t, mask=cmask, other=0.0).to(gy.dtype)
                gy += wv[:, None] * gsh
            gy_off = (tl.load(mrow + PD_GRAD_PW) + n * tl.load(mrow + PD_GRAD_PW_ROW_STRIDE)
                      + ch.to(tl.int64) * HW)
            tl.store(gy_ptr + gy_off[:, None] + (py * W + px)[None, :], gy.to(gy_ptr.dtype.element_ty),
                     mask=cmask[:, None] & pm[None, :])
            tl.debug_barrier()


# ----------------------------------------------------------------------------- grouped 1x1 / weight grad
@triton.jit
def _acc_zeros(M: tl.constexpr, N: tl.constexpr, F64: tl.constexpr):
    """A zero [M, N] accumulator: float64 for float64 inputs, else float32."""
    if F64:
        acc = tl.zeros([M, N], dtype=tl.float64)
    else:
        acc = tl.zeros([M, N], dtype=tl.float32)
    return acc


@triton.jit
def _out_tile(cb, C, pt, HW, BC: tl.constexpr, BP: tl.constexpr, F64: tl.constexpr):
    """Channel block cb (of C) and pixel tile pt (of HW): (channels, mask, pixels, mask, zero accumulator)."""
    ch = cb * BC + tl.arange(0, BC)
    p = pt * BP + tl.arange(0, BP)
    return ch, ch < C, p, p < HW, _acc_zeros(BC, BP, F64)


@triton.jit
def _row_program(offsets_ptr, meta_ptr, n_pt, E: tl.constexpr):
    """Grids (N * n_pt, ...): this program's (row n, pixel tile, meta row)."""
    pid0 = tl.program_id(0)
    n = pid0 // n_pt
    return n, pid0 % n_pt, meta_ptr + _expert_of(offsets_ptr, n, E) * META_ROW


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, nw_ptr, nb_ptr, offsets_ptr, meta_ptr, perm_ptr, kslots, HW,
                 n_pt, eps, E: tl.constexpr, GATHER: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                 NORM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, IEEE: tl.constexpr,
                 F64: tl.constexpr):
    """Y[n, c, p] = sum_ci W_e[c, ci] X[srow, ci, p] (+ b_e[c]) (+ R[n, c, p] if ACC; R laid out as Y,
    r_ptr = y_ptr to accumulate into Y); srow = perm[n] // kslots if GATHER. NORM > 0: of the
    LayerNorm of X over its cin channels (weight nw, bias nb; 1 WithBias, 2 BiasFree; _ln_fold_step)."""
    n, pt, mrow = _row_program(offsets_ptr, meta_ptr, n_pt, E)
    cb = tl.program_id(1)
    cin = tl.load(mrow + MM_C_IN).to(tl.int32)
    cout = tl.load(mrow + MM_C_OUT).to(tl.int32)
    if cb * BC < cout:
        w_off = tl.load(mrow + MM_WEIGHT)
        w_so = tl.load(mrow + MM_WEIGHT_OUT_STRIDE)
        w_si = tl.load(mrow + MM_WEIGHT_IN_STRIDE)
        x_off = _src_offset(mrow, perm_ptr, n, kslots, GATHER, MM_SRC, MM_SRC_ROW_STRIDE)
        ch, cm, p, pm, acc = _out_tile(cb, cout, pt, HW, BC, BP, F64)
        if NORM > 0:
            shift, s1, s2, u, v = _ln_fold_init(x_ptr + x_off, p, pm, acc)
        for k0 in range(0, cin, BK):
            ks = k0 + tl.arange(0, BK)
            km = ks < cin
            xt = tl.load(x_ptr + x_off + ks[:, None].to(tl.int64) * HW + p[None, :], mask=km[:, None] & pm[None, :],
                         other=0.0)
            wt = tl.load(w_ptr + w_off + ch[:, None] * w_so + ks[None, :] * w_si, mask=cm[:, None] & km[None, :],
                         other=0.0)
            if NORM > 0:
                wt, xt, s1, s2, u, v = _ln_fold_step(xt, wt, km[:, None] & pm[None, :], shift, nw_ptr, nb_ptr, ks, km,
                                                     s1, s2, u, v, NORM)
            if IEEE:
                acc += _mm(wt.to(acc.dtype), xt.to(acc.dtype), True)
            else:
                acc += _mm(wt, xt.to(wt.dtype), False)
        if NORM > 0:
            acc = _ln_fold_finish(acc, s1, s2, u, v, shift, cin, eps, NORM)
        if HAS_B:
            acc += tl.load(b_ptr + tl.load(mrow + MM_BIAS) + ch, mask=cm, other=0.0).to(acc.dtype)[:, None]
        y_off = tl.load(mrow + MM_OUT) + n * tl.load(mrow + MM_OUT_ROW_STRIDE) + ch.to(tl.int64) * HW
        offs = y_off[:, None] + p[None, :]
        m2 = cm[:, None] & pm[None, :]
        if ACC:
            acc += tl.load(r_ptr + offs, mask=m2, other=0.0).to(acc.dtype)
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _wgrad_kernel(g_ptr, x_ptr, o_ptr, bo_ptr, offsets_ptr, meta_ptr, perm_ptr, kslots, HW, npc, n_split,
                  GATHER: tl.constexpr, HAS_B: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                  BP: tl.constexpr, IEEE: tl.constexpr):
    """dW_e[c, ci] += sum_{n in segment e, p} G[n, c, p] X[srow, ci, p]; with HAS_B also
    db_e[c] += sum G. Program (e * n_split + split, c-block, ci-block); atomics into o / bo."""
    pid0 = tl.program_id(0)
    cb = tl.program_id(1)
    kb = tl.program_id(2)
    e = pid0 // n_split
    sp = pid0 % n_split
    mrow = meta_ptr + e * META_ROW
    cout = tl.load(mrow + WG_C_OUT).to(tl.int32)
    cin = tl.load(mrow + WG_C_IN).to(tl.int32)
    if (cb * BC < cout) & (kb * BK < cin):
        lo = tl.load(offsets_ptr + e)
        hi = tl.load(offsets_ptr + e + 1)
        g_base = tl.load(mrow + WG_G)
        g_rs = tl.load(mrow + WG_G_ROW_STRIDE)
        x_base = tl.load(mrow + WG_X)
        x_rs = tl.load(mrow + WG_X_ROW_STRIDE)
        ch = cb * BC + tl.arange(0, BC)
        cm = ch < cout
        ks = kb * BK + tl.arange(0, BK)
        km = ks < cin
        acc = tl.zeros([BC, BK], dtype=o_ptr.dtype.element_ty)
        bacc = tl.zeros([BC], dtype=o_ptr.dtype.element_ty)
        for wi in range(sp, (hi - lo) * npc, n_split):
            n = lo + wi // npc
            p = (wi % npc) * BP + tl.arange(0, BP)
            pm = p < HW
            srow = n
            if GATHER:
                srow = tl.load(perm_ptr + n) // kslots
            gt = tl.load(g_ptr + g_base + n * g_rs + ch[:, None].to(tl.int64) * HW + p[None, :],
                         mask=cm[:, None] & pm[None, :], other=0.0)
            xt = tl.load(x_ptr + x_base + srow * x_rs + ks[None, :].to(tl.int64) * HW + p[:, None],
                         mask=km[None, :] & pm[:, None], other=0.0)
            if IEEE:
                acc += _mm(gt.to(acc.dtype), xt.to(acc.dtype), True)
            else:
                acc += _mm(gt, xt.to(gt.dtype), False)
            if HAS_B:
                bacc += tl.sum(gt.to(acc.dtype), axis=1)
        o_off = tl.load(mrow + WG_GRAD_WEIGHT)
        tl.atomic_add(o_ptr + o_off + ch[:, None] * cin + ks[None, :], acc, mask=cm[:, None] & km[None, :])
        if HAS_B:
            if kb == 0:
                tl.atomic_add(bo_ptr + tl.load(mrow + WG_GRAD_BIAS) + ch, bacc, mask=cm)


# ----------------------------------------------------------------------------- launchers
# 8 warps: the (BC, BP) fp32 tiles and their 64-bit pointer tensors need ~230-255 registers per
# thread at 4 warps (spilling in the backward / gated kernels; benchmarks/static_report.py).
PWDW_WARPS = 8


def _pwdw_warps() -> int:
    """Warps of the fused pw->dw kernels: the setting ``pwdw_warps`` (``MOCE_PWDW_WARPS``), else PWDW_WARPS."""
    return PWDW_WARPS if SETTINGS.pwdw_warps is None else SETTINGS.pwdw_warps


class _PwDwGrid(NamedTuple):
    """Tiles and persistent grid of the fused pw->dw kernels for one launch."""
    H: int
    W: int
    tiles_w: int    # tiles along W
    tiles: int      # tiles per image
    channel_blocks: int
    total: int      # work items: N * tiles * channel_blocks
    programs: int
    scratch: int    # elements of one program's scratch slot per 1x1 half
    constexprs: Dict[str, int]

    def args(self) -> Tuple[int, ...]:
        """The kernels' grid arguments after ``kslots``."""
        return self.H, self.W, self.tiles_w, self.tiles, self.channel_blocks, self.total


def _pwdw_grid(src: torch.Tensor, N: int, H: int, W: int, K: int, max_ch: int) -> _PwDwGrid:
    """8 x 16 pixel tiles, 32 channels per block, for ``max_ch`` output channels per row."""
    TH, TW, BC, BHC = 8, 16, 32, 64
    # ceil divisions written out (``cdiv``'s ``(a + b - 1) // b``): this runs once per fused pw->dw launch
    hstride = ((TH + K - 1) * (TW + K - 1) + BHC - 1) // BHC * BHC  # the tile and its halo, padded
    tiles_w = (W + TW - 1) // TW
    tiles = tiles_w * ((H + TH - 1) // TH)
    blocks = (max_ch + BC - 1) // BC
    total = N * tiles * blocks
    cx = dict(K=K, TH=TH, TW=TW, BC=BC, BK=16 if src.dtype == torch.float64 else 32, BHC=BHC, BP=128,
              HSTRIDE=hstride)
    return _PwDwGrid(H, W, tiles_w, tiles, blocks, total, max(1, min(total, _num_programs_cap(src.device))),
                     BC * hstride, cx)


# A LayerNorm over the source's channels before the 1x1: (weight, bias or None for BiasFree, eps).
Norm = Optional[Tuple[torch.Tensor, Optional[torch.Tensor], float]]


def _norm_args(norm: Norm, dummy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, float, int]:
    """(norm weight, norm bias, eps, NORM) kernel arguments: NORM 0 none, 1 WithBias, 2 BiasFree."""
    if norm is None:
        return dummy, dummy, 0.0, 0
    norm_w, norm_b, eps = norm
    return norm_w, (norm_b if norm_b is not None else norm_w), float(eps), (1 if norm_b is not None else 2)


def launch_pwdw(src: torch.Tensor, w: torch.Tensor, dw: torch.Tensor, pb: Optional[torch.Tensor],
                db: Optional[torch.Tensor], out: torch.Tensor, offsets: torch.Tensor, meta: torch.Tensor,
                N: int, H: int, W: int, K: int, max_nch: int, mode: PwDwMode = PwDwMode.PLAIN,
                perm: Optional[torch.Tensor] = None, kslots: int = 1,
                g: Optional[torch.Tensor] = None, gofull: Optional[torch.Tensor] = None, norm: Norm = None) -> None:
    """``ExpertStageKernels.pwdw``: grouped fused pw->dw over N rows (see _pwdw_kernel); ``norm``: of the
    LayerNorm of src (the trunk's LN -> pw -> dw, :mod:`.norm_conv`)."""
    grid = _pwdw_grid(src, N, H, W, K, max_nch)
    halves = 1 if mode == PwDwMode.PLAIN else 2
    scratch = torch.empty(grid.programs * halves * grid.scratch, dtype=_acc_dtype(src.dtype), device=src.device)
    norm_w, norm_b, eps, norm_mode = _norm_args(norm, w)
    _pwdw_kernel[(grid.programs,)](
        src, w, dw, pb if pb is not None else w, db if db is not None else w, out,
        g if g is not None else out, gofull if gofull is not None else scratch, scratch, offsets, meta,
        perm if perm is not None else offsets, norm_w, norm_b, kslots, *grid.args(), eps,
        E=meta.shape[0], MODE=int(mode), GATHER=perm is not None, HAS_PB=pb is not None, HAS_DB=db is not None,
        NORM=norm_mode, IEEE=_ieee(src.dtype), num_warps=_pwdw_warps(), **grid.constexprs)


def launch_pwdw_backward(src: torch.Tensor, w: torch.Tensor, dw: torch.Tensor, pb: Optional[torch.Tensor],
                         go: torch.Tensor, gy: torch.Tensor, gdw: torch.Tensor, gdb: Optional[torch.Tensor],
                         offsets: torch.Tensor, meta: torch.Tensor, N: int, H: int, W: int, K: int, max_cout: int,
                         perm: Optional[torch.Tensor] = None, kslots: int = 1) -> None:
    """``ExpertStageKernels.pwdw_backward`` (see _pwdw_bwd_kernel)."""
    grid = _pwdw_grid(src, N, H, W, K, max_cout)
    scratch = torch.empty(grid.programs * grid.scratch, dtype=_acc_dtype(src.dtype), device=src.device)
    _pwdw_bwd_kernel[(grid.programs,)](
        src, w, dw, pb if pb is not None else w, go, gy, gdw, gdb if gdb is not None else gdw, scratch, offsets,
        meta, perm if perm is not None else offsets, kslots, *grid.args(),
        E=meta.shape[0], GATHER=perm is not None, HAS_PB=pb is not None, HAS_DB=gdb is not None,
        IEEE=_ieee(src.dtype), num_warps=_pwdw_warps(), **grid.constexprs)


def launch_gemm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor,
                offsets: torch.Tensor, meta: torch.Tensor, N: int, HW: int, max_cout: int,
                perm: Optional[torch.Tensor] = None, kslots: int = 1, accumulate: bool = False,
                residual: Optional[torch.Tensor] = None, norm: Norm = None) -> None:
    """``ExpertStageKernels.gemm`` (see _gemm_kernel): ``accumulate`` adds into y, ``residual`` (laid out as
    y) adds it instead; ``norm``: of the LayerNorm of x."""
    if accumulate and residual is not None:
        raise ValueError("launch_gemm: accumulate into y or add a residual, not both")
    E = meta.shape[0]
    ieee = _ieee(x.dtype) or _ieee(w.dtype)  # 16-bit operands: tensor cores, also into an fp32 output
    BC, BK, BP = 32, (16 if torch.float64 in (x.dtype, w.dtype, y.dtype) else 32), 128
    n_pt = cdiv(HW, BP)
    grid = (N * n_pt, cdiv(max_cout, BC))
    norm_w, norm_b, eps, norm_mode = _norm_args(norm, w)
    _gemm_kernel[grid](x, w, b if b is not None else w, y, residual if residual is not None else y, norm_w, norm_b,
                       offsets, meta, perm if perm is not None else offsets, kslots, HW, n_pt, eps, E=E,
                       GATHER=perm is not None, HAS_B=b is not None, ACC=accumulate or residual is not None,
                       NORM=norm_mode, BC=BC, BK=BK, BP=BP, IEEE=ieee, F64=y.dtype == torch.float64, num_warps=4)


def launch_wgrad(g: torch.Tensor, x: torch.Tensor, o: torch.Tensor, bo: Optional[torch.Tensor],
                 offsets: torch.Tensor, meta: torch.Tensor, HW: int, max_cout: int, max_cin: int, N: int,
                 perm: Optional[torch.Tensor] = None, kslots: int = 1) -> None:
    """``ExpertStageKernels.wgrad`` (see _wgrad_kernel); o / bo are float32/64 accumulators."""
    E = meta.shape[0]
    ieee = _ieee(g.dtype) or _ieee(x.dtype)
    BC, BK, BP = 32, 32, 64
    npc = cdiv(HW, BP)
    n_split = max(1, min(N * npc, 64 if g.device.type == "cuda" else 2))
    grid = (E * n_split, cdiv(max_cout, BC), cdiv(max_cin, BK))
    _wgrad_kernel[grid](g, x, o, bo if bo is not None else o, offsets, meta, perm if perm is not None else offsets,
                        kslots, HW, npc, n_split, GATHER=perm is not None, HAS_B=bo is not None, BC=BC, BK=BK,
                        BP=BP, IEEE=ieee, num_warps=4)
