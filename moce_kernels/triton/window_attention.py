"""Triton window FFT attention: ``LN_C(crop(circconv_p(q, k))) * v``, forward and backward.

Design (details and byte/FLOP counts in benchmarks/notes/window_attention.md). One program owns
one batch row ``n`` and one pixel tile and loops over the channels. Every per-window 2-D DFT is a
matrix product on tensor cores (tl.dot), with constant DFT matrices loaded once per program:

* separable layout (p = 8, 16, 32): a T x T pixel tile, T = max(p, 16) (tl.dot needs >= 16), and
  ``F = C - iS`` the T x T block-diagonal DFT matrix of size-p blocks (``C[a, b] = cos(2 pi ab/p)``,
  ``S`` the sine, both symmetric): ``X^ = F x F`` (left and right products);
* Kronecker layout (p = 4): one window per tile row, its 16 pixels along the columns, and
  ``X^ = x (F (x) F)``: one 16-wide product instead of two 4x-wasteful block-diagonal ones.

Both real inputs ride in one complex transform: with ``z = q + ik`` and ``Z = DFT(z)``,
``q (*) k = Im(z (*) z) / 2 = Im(IDFT(Z^2)) / 2`` (14 real dots per channel and tile in the
separable layout instead of 18; 6 in the Kronecker layout). Zero padding to a multiple of p is the
masked load (tiles may run past the padded image; those windows are all zero and never stored).

The LayerNorm couples all channels of a pixel. When every channel of a tile fits one block
(``one_shot_channels``: the level-2 experts), the forward convolves each channel once and normalises
in registers; otherwise it makes two passes over the channels (statistics, then normalise and store),
recomputing the convolution instead of spilling C x tile fp32 values (see the notes for the
byte/FLOP trade), with statistics shifted by channel 0's value for a numerically safe one-pass
variance.

Backward (g = d out): with y the convolution, yh = (y - mu) * rstd, z = yh * w + b, out = z * v:
    grad_v = g * z;  gz = g * v;  grad_w = sum gz * yh;  grad_b = sum gz;  gyh = gz * w
    gy = rstd * (gyh - mean_C(gyh) - yh * mean_C(gyh * yh))     (zero outside H x W)
    grad_k + i grad_q = sum_i gy[i] (q + ik)[i - a] = F (Z conj(DFT(gy))) F / p^2
in three channel passes (statistics; channel means and per-tile weight/bias partials; gradients).

Entry points ``window_attention_rows`` / ``window_attention_rows_backward`` compute only the batch
rows ``rows[0] <= n < rows[1]`` (``rows`` a device int64 tensor, never read on the host); the grid
is sized by N and programs outside the range exit at once.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from ..backends import FP32_AND_16BIT, register_all, triton_interpreted
from ..settings import SETTINGS
from ..expert_stage.implementations import window_attention_implementations
from ._host import cdiv, next_power_of_2

WINDOW_SIZES = (4, 8, 16, 32, 64)
# Dot precision (all accumulate in fp32). fp32 inputs: "tf32x3" (three tf32 products per dot, about
# fp32 accuracy, on tensor cores); "ieee" (exact FMA dots, MOCE_WFA_FP32_PRECISION=ieee) compiles to
# kernels that spill kilobytes per thread on sm_90 (benchmarks/static_report.py --dtype float32).
# 16-bit inputs: "tf32" (one product; the tensor cores ignore the operands' low 13 mantissa bits) when
# C > LOWP_SMALL_C, else "tf32x3": with few channels the LayerNorm's per-pixel variance is often tiny
# and its 1/std amplifies the dots' rounding past the error rule (the seed scan in the notes: C = 3
# fails in ~half the draws, C = 4 at 256 x 256 in half, C >= 6 in none).
FP32_PRECISION = "tf32x3"
LOWP_SMALL_C = 5

# Programs below which the channels are split into chunks (None: 2x the GPU's SM count; CPU: never).
SPLIT_TARGET_PROGRAMS = None

_MATS: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}


# p = 4 uses the Kronecker layout: one window per tile row, its 16 pixels along the columns, so
# the 2-D DFT is a single (M, 16) x (16, 16) product with F (x) F instead of two products with
# 4x-wasteful block-diagonal 16 x 16 matrices. KRON_WC windows per block row (coalescing along W).
KRON_P = 4
KRON_WINDOWS = 64
KRON_WC = 16


class Layout(NamedTuple):
    """Tile geometry of the kernels for one window size."""
    br: int      # tile rows (separable: T pixels; kron: windows)
    bc: int      # tile cols (separable: T pixels; kron: p*p pixels of a window)
    kron: bool
    tile_h: int  # pixels covered per program
    tile_w: int
    wc: int      # kron: windows per block row


def tile_size(p: int) -> int:
    """Pixel tile edge T of the separable layout for window p: a multiple of p and >= 16 (tl.dot's minimum)."""
    return max(p, 16)


def layout(p: int) -> Layout:
    if p == KRON_P:
        return Layout(KRON_WINDOWS, p * p, True, (KRON_WINDOWS // KRON_WC) * p, KRON_WC * p, KRON_WC)
    t = tile_size(p)
    return Layout(t, t, False, t, t, 1)


def n_tiles(p: int, H: int, W: int) -> int:
    lay = layout(p)
    return cdiv(H, lay.tile_h) * cdiv(W, lay.tile_w)


def dft_matrices(p: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(C, S), float32 on device: separable layout, the (T, T) block-diagonal cos/sin DFT matrices
    of size-p blocks; Kronecker layout, cos/sin(2 pi (a u + b f) / p) for e = (a, b), e' = (u, f)."""
    lay = layout(p)
    key = (p, str(device))
    if key not in _MATS:
        if lay.kron:
            e = torch.arange(p * p, dtype=torch.int64)
            a, b = e // p, e % p
            m = (a[:, None] * a[None, :] + b[:, None] * b[None, :]) % p
            same = torch.ones(p * p, p * p, dtype=torch.bool)
        else:
            a = torch.arange(lay.br, dtype=torch.int64)
            same = (a[:, None] // p) == (a[None, :] // p)
            m = ((a[:, None] % p) * (a[None, :] % p)) % p
        ang = 2.0 * math.pi * m.double() / p
        zero = torch.zeros((), dtype=torch.float64)
        c = torch.where(same, torch.cos(ang), zero)
        s = torch.where(same, torch.sin(ang), zero)
        _MATS[key] = (c.float().contiguous().to(device), s.float().contiguous().to(device))
    return _MATS[key]


def precision(dtype: torch.dtype, C: int) -> str:
    """input_precision of the kernels' dots for inputs of ``dtype`` with C channels."""
    if dtype == torch.float32:
        return SETTINGS.wfa_fp32_precision or FP32_PRECISION
    return "tf32x3" if C <= LOWP_SMALL_C else "tf32"


# Channels per block (CB): each dot carries CB channels' tiles, (CB * BR, BC) = 2048 elements for
# T = 16, 2048 for the Kronecker p = 4 tile (64 windows x 16), 2048 for T = 32, with one-product
# ("tf32") dots; about half that for "tf32x3" / "ieee", whose split operands need twice the
# registers, except p = 32, where CB * BR = 32 rows would drop the right products from wgmma
# (M >= 64) to unrolled mma.sync chains that spill (sm_90 static report).
# p = 64 (the fifth expert of a ``num_experts=5`` model; no released preset has one) takes one
# channel per block: a 64 x 64 tile already holds 4096 elements per operand.
CHANNEL_BLOCK = {4: 2, 8: 8, 16: 8, 32: 2, 64: 1}
CHANNEL_BLOCK_WIDE = {4: 1, 8: 4, 16: 4, 32: 2, 64: 1}
NUM_WARPS = {4: 4, 8: 4, 16: 4, 32: 8, 64: 8}


def _wide(prec: str) -> bool:
    return prec != "tf32"


def channel_block(p: int, C: int, prec: str = "tf32") -> int:
    """Channels per block for window p, C channels and dot precision (a power of two, at most C rounded up)."""
    cb = (CHANNEL_BLOCK_WIDE if _wide(prec) else CHANNEL_BLOCK)[p]
    return max(1, min(cb, next_power_of_2(C)))


def _num_warps(p: int) -> int:
    return NUM_WARPS[p]


# One-shot kernels: every channel of a tile in one (CB, BR, BC) block when CB = next_pow2(C) keeps the
# block within ONE_SHOT_ELEMS fp32 elements (32 registers per thread and live tensor at 8 warps): one
# convolution per channel instead of two (forward) or three (backward), q, k, v, g read once. The
# forward fits the level-2 experts of both presets (C = 6, 12, 24 at p = 4, 8, 16); the backward keeps
# more tensors live (the spectrum, yh, gy, its transform) and spills above half that (sm_90,
# benchmarks/static_report.py), so its limit is half. Larger C keep the multi-pass recompute.
ONE_SHOT_ELEMS = 8192  # the setting wfa_one_shot_elems (MOCE_WFA_ONE_SHOT_ELEMS) overrides it
ONE_SHOT_WARPS = 8


def one_shot_channels(p: int, C: int, backward: bool = False, prec: str = "tf32") -> int:
    """Channel block of the one-shot kernels for window p, C channels and dot precision, or 0 when C
    does not fit (limits halved for the backward and for split-operand precisions)."""
    lay = layout(p)
    cb = next_power_of_2(C)
    elems = ONE_SHOT_ELEMS if SETTINGS.wfa_one_shot_elems is None else SETTINGS.wfa_one_shot_elems
    limit = elems // (2 if backward else 1) // (2 if _wide(prec) else 1)
    return cb if cb * lay.br * lay.bc <= limit else 0


def _constexprs(p: int, prec: str, C: int, cb: int = 0) -> dict:
    """Kernel constexprs; CB = ``cb`` when given (the one-shot block), else ``channel_block``."""
    lay = layout(p)
    return dict(BR=lay.br, BC=lay.bc, CB=cb or channel_block(p, C, prec), KRON=lay.kron, P=p, WC=lay.wc, PREC=prec)


# ----------------------------------------------------------------------------------------------
# Device helpers. Every per-channel tile is handled CB channels at a time as a (CB, BR, BC) block:
# the right products (along the tile's columns) are one 2-D dot with CB*BR rows, the left products
# (separable layout, along the rows) one batched 3-D dot, so each dot carries CB channels of work
# instead of one 16 x 16 tile (a serial chain of tiny dots per channel would be latency-bound).
# ----------------------------------------------------------------------------------------------

# Triton's interpreter multiplies exactly whatever input_precision says; on the GPU a "tf32" dot
# feeds fp32 bit patterns to the tensor cores, which ignore the low 13 mantissa bits, and "tf32x3"
# splits each operand into big = round-to-nearest-away(tf32) and small = rest (Triton's lowering).
# Under the interpreter the kernels make those roundings themselves, so that the CPU tests hold the
# GPU's numerics, not exact fp32 products, to the error rule.
_EMULATE_TF32 = tl.constexpr(triton_interpreted())


@triton.jit
def _tf32_trunc(x):
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_rna(x):
    bits = x.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, ((bits + 0x1000) & 0xFFFFE000), bits).to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    if _EMULATE_TF32 and PREC == "tf32":
        return tl.dot(_tf32_trunc(a), _tf32_trunc(b), input_precision="ieee", out_dtype=tl.float32)
    elif _EMULATE_TF32 and PREC == "tf32x3":
        ab = _tf32_rna(a)
        bb = _tf32_rna(b)
        asm = _tf32_trunc(a - ab)
        bsm = _tf32_trunc(b - bb)
        return (tl.dot(ab, bsm, input_precision="ieee", out_dtype=tl.float32)
                + tl.dot(asm, bb, input_precision="ieee", out_dtype=tl.float32)
                + tl.dot(ab, bb, input_precision="ieee", out_dtype=tl.float32))
    else:
        return tl.dot(a, b, input_precision=PREC, out_dtype=tl.float32)


@triton.jit
def _rmul(x, m, PREC: tl.constexpr):
    """(CB, BR, BC) x (BC, BC) along the last axis, as one (CB*BR, BC) dot."""
    CB: tl.constexpr = x.shape[0]
    BR: tl.constexpr = x.shape[1]
    BC: tl.constexpr = x.shape[2]
    return tl.reshape(_mm(tl.reshape(x, [CB * BR, BC]), m, PREC), [CB, BR, BC])


@triton.jit
def _lmul(m3, x, PREC: tl.constexpr):
    """(CB, BR, BR) x (CB, BR, BC): the per-channel left product (m3: the matrix broadcast over CB)."""
    return _mm(m3, x, PREC)


@triton.jit
def _fwd(x, cm, sm, cm3, sm3, PREC: tl.constexpr, KRON: tl.constexpr):
    """Per-window 2-D DFT of a real block: (Re, Im) of F x F with F = C - iS (6 dots); KRON: the
    block holds one window per row and the DFT is x (KC - iKS) (2 dots)."""
    if KRON:
        re = _rmul(x, cm, PREC)
        im = -_rmul(x, sm, PREC)
    else:
        a = _rmul(x, cm, PREC)
        b = _rmul(x, sm, PREC)
        re = _lmul(cm3, a, PREC) - _lmul(sm3, b, PREC)
        im = -(_lmul(cm3, b, PREC) + _lmul(sm3, a, PREC))
    return re, im


@triton.jit
def _fwd_c(xr, xi, cm, sm, cm3, sm3, PREC: tl.constexpr, KRON: tl.constexpr):
    """Per-window 2-D DFT F x F of a complex block xr + i xi (8 dots; KRON: 4)."""
    ar = _rmul(xr, cm, PREC) + _rmul(xi, sm, PREC)
    ai = _rmul(xi, cm, PREC) - _rmul(xr, sm, PREC)
    if KRON:
        re = ar
        im = ai
    else:
        re = _lmul(cm3, ar, PREC) + _lmul(sm3, ai, PREC)
        im = _lmul(cm3, ai, PREC) - _lmul(sm3, ar, PREC)
    return re, im


@triton.jit
def _inv_im(pr, pi, cm, sm, cm3, sm3, PREC: tl.constexpr, KRON: tl.constexpr):
    """Imaginary part of F* P F* (unnormalised per-window inverse 2-D DFT), F* = C + iS (6 dots;
    KRON: Im(P (KC + iKS)), 2 dots)."""
    ti = _rmul(pr, sm, PREC) + _rmul(pi, cm, PREC)
    if KRON:
        res = ti
    else:
        tr = _rmul(pr, cm, PREC) - _rmul(pi, sm, PREC)
        res = _lmul(cm3, ti, PREC) + _lmul(sm3, tr, PREC)
    return res


@triton.jit
def _spectrum(q, k, cm, sm, cm3, sm3, PREC: tl.constexpr, KRON: tl.constexpr):
    """Z = DFT(q + i k): one complex transform carries both real inputs."""
    return _fwd_c(q, k, cm, sm, cm3, sm3, PREC, KRON)


@triton.jit
def _conv_from_spectrum(zr, zi, cm, sm, cm3, sm3, half_inv_pp, PREC: tl.constexpr, KRON: tl.constexpr):
    """q (*) k = Im((q + ik) (*) (q + ik)) / 2 = Im(IDFT(Z^2)) / 2 (circular, per window)."""
    return _inv_im(zr * zr - zi * zi, 2.0 * zr * zi, cm, sm, cm3, sm3, PREC, KRON) * half_inv_pp


@triton.jit
def _conv(q, k, cm, sm, cm3, sm3, half_inv_pp, PREC: tl.constexpr, KRON: tl.constexpr):
    """Per-window circular convolution of q with k on a (CB, BR, BC) block (14 dots; KRON: 6)."""
    zr, zi = _spectrum(q, k, cm, sm, cm3, sm3, PREC, KRON)
    return _conv_from_spectrum(zr, zi, cm, sm, cm3, sm3, half_inv_pp, PREC, KRON)


@triton.jit
def _tile_setup(rows_ptr, cmat_ptr, smat_ptr, H, W, BR: tl.constexpr, BC: tl.constexpr, CB: tl.constexpr,
                KRON: tl.constexpr, P: tl.constexpr, WC: tl.constexpr):
    """Row range, tile pixel offsets/mask and the DFT matrices of this program (2-D, and broadcast
    over the CB channels of a block for the left products).

    Separable: a (BR, BC) = (T, T) pixel tile. KRON: a (BR, BC) = (windows, p*p) tile, row m is
    window (m // WC, m % WC) of a block of BR // WC x WC windows, column e = a*p + b its pixel (a, b).
    """
    begin = tl.load(rows_ptr)
    end = tl.load(rows_ptr + 1)
    pid = tl.program_id(0)
    if KRON:
        n_tw = tl.cdiv(W, WC * P)
        m = tl.arange(0, BR)
        e = tl.arange(0, BC)
        r = (pid // n_tw) * ((BR // WC) * P) + (m // WC)[:, None] * P + (e // P)[None, :]
        c = (pid % n_tw) * (WC * P) + (m % WC)[:, None] * P + (e % P)[None, :]
        mask = (r < H) & (c < W)
        offs = r * W + c
    else:
        n_tw = tl.cdiv(W, BC)
        r = (pid // n_tw) * BR + tl.arange(0, BR)
        c = (pid % n_tw) * BC + tl.arange(0, BC)
        mask = (r < H)[:, None] & (c < W)[None, :]
        offs = r[:, None] * W + c[None, :]
    m_idx = tl.arange(0, BC)[:, None] * BC + tl.arange(0, BC)[None, :]
    cm = tl.load(cmat_ptr + m_idx)
    sm = tl.load(smat_ptr + m_idx)
    if KRON:
        cm3 = cm  # unused: the Kronecker layout has no left products
        sm3 = sm
    else:
        cm3 = tl.broadcast_to(cm[None, :, :], [CB, BC, BC])
        sm3 = tl.broadcast_to(sm[None, :, :], [CB, BC, BC])
    return begin, end, offs, mask, cm, sm, cm3, sm3


@triton.jit
def _block(row_base, HW, offs, mask, c, c_end, CB: tl.constexpr):
    """Element offsets (CB, BR, BC) and mask of channels [c, c + CB) of a tile (channels >= c_end masked)."""
    ch = c + tl.arange(0, CB)
    cmask = ch < c_end
    boffs = row_base + ch.to(tl.int64)[:, None, None] * HW + offs[None, :, :]
    bmask = cmask[:, None, None] & mask[None, :, :]
    return ch, cmask, boffs, bmask


@triton.jit
def _load_f32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _channel_param(ptr, ch, cmask):
    """Per-channel parameter (C,) as a (CB, 1, 1) fp32 block (0 on masked channels)."""
    return tl.load(ptr + ch, mask=cmask, other=0.0).to(tl.float32)[:, None, None]


@triton.jit
def _oneshot_setup(rows_ptr, cmat_ptr, smat_ptr, C, H, W, BR: tl.constexpr, BC: tl.constexpr, CB: tl.constexpr,
                   KRON: tl.constexpr, P: tl.constexpr, WC: tl.constexpr):
    """A one-shot program's tile: (active, channels, channel mask, element offsets and mask of the
    (CB, BR, BC) block holding every channel, DFT matrices)."""
    n = tl.program_id(1)
    begin, end, offs, mask, cm, sm, cm3, sm3 = _tile_setup(rows_ptr, cmat_ptr, smat_ptr, H, W, BR, BC, CB, KRON,
                                                           P, WC)
    HW = H * W
    ch, cmask, boffs, bmask = _block(n.to(tl.int64) * C * HW, HW, offs, mask, 0, C, CB)
    return (n >= begin) & (n < end), ch, cmask, boffs, bmask, cm, sm, cm3, sm3


@triton.jit
def _conv_block(q_ptr, k_ptr, boffs, bmask, cm, sm, cm3, sm3, half_inv_pp, PREC: tl.constexpr, KRON: tl.constexpr):
    return _conv(_load_f32(q_ptr, boffs, bmask), _load_f32(k_ptr, boffs, bmask), cm, sm, cm3, sm3, half_inv_pp,
                 PREC, KRON)


@triton.jit
def _chunk_moments(q_ptr, k_ptr, row_base, HW, offs, mask, c0, c1, cm, sm, cm3, sm3, half_inv_pp,
                   CB: tl.constexpr, PREC: tl.constexpr, KRON: tl.constexpr):
    """Per-pixel mean and M2 (sum of squared deviations) of the convolution over channels
    [c0, c1), from one-pass sums shifted by channel c0's value (numerically safe)."""
    ch, cmask, boffs, bmask = _block(row_base, HW, offs, mask, c0, c1, CB)
    y = _conv_block(q_ptr, k_ptr, boffs, bmask, cm, sm, cm3, sm3, half_inv_pp, PREC, KRON)
    shift = tl.sum(tl.where((ch == c0)[:, None, None], y, 0.0), axis=0)
    d = tl.where(cmask[:, None, None], y - shift[None, :, :], 0.0)
    s1 = tl.sum(d, axis=0)
    s2 = tl.sum(d * d, axis=0)
    for c in range(c0 + CB, c1, CB):
        ch, cmask, boffs, bmask = _block(row_base, HW, offs, mask, c, c1, CB)
        y = _conv_block(q_ptr, k_ptr, boffs, bmask, cm, sm, cm3, sm3, half_inv_pp, PREC, KRON)
        d = tl.where(cmask[:, None, None], y - shift[None, :, :], 0.0)
        s1 += tl.sum(d, axis=0)
        s2 += tl.sum(d * d, axis=0)
    m = s1 / (c1 - c0)
    return shift + m, tl.maximum(s2 - s1 * m, 0.0)


@triton.jit
def _ln_stats(q_ptr, k_ptr, stats_ptr, row_base, stat_base, stat_stride, HW, offs, mask, e_idx, C, CS, S,
              cm, sm, cm3, sm3, half_inv_pp, eps, BR: tl.constexpr, BC: tl.constexpr, CB: tl.constexpr,
              SPLIT: tl.constexpr, PREC: tl.constexpr, KRON: tl.constexpr):
    """Per-pixel LayerNorm (mean, rstd) over all C channels. SPLIT: Chan's parallel combination of
    the S per-chunk (mean, M2) tiles written by _wfa_stats_kernel; else computed here."""
    if SPLIT:
        mean = tl.zeros([BR, BC], dtype=tl.float32)
        m2 = tl.zeros([BR, BC], dtype=tl.float32)
        na = 0.0
        for s in range(0, S):
            nb = (tl.minimum(C, (s + 1) * CS) - s * CS).to(tl.float32)
            base = stat_base + s * stat_stride
            mb = tl.load(stats_ptr + base + e_idx)
            m2b = tl.load(stats_ptr + base + BR * BC + e_idx)
            nab = na + nb
            delta = mb - mean
            mean += delta * (nb / nab)
            m2 += m2b + delta * delta * (na * nb / nab)
            na = nab
    else:
        mean, m2 = _chunk_moments(q_ptr, k_ptr, row_base, HW, offs, mask, 0, C, cm, sm, cm3, sm3, half_inv_pp,
                                  CB, PREC, KRON)
    return mean, 1.0 / tl.sqrt(m2 / C + eps)


@triton.jit
def _program(rows_ptr, cmat_ptr, smat_ptr, C, H, W, num_tiles, CS, S, BR: tl.constexpr, BC: tl.constexpr,
             CB: tl.constexpr, KRON: tl.constexpr, P: tl.constexpr, WC: tl.constexpr):
    """Everything a program needs: (active, offs, mask, DFT matrices, row base, channel chunk
    [c0, c1), base/stride of its tiles in the (N, S, num_tiles, 2, BR*BC) statistics workspaces,
    element index inside a tile)."""
    n = tl.program_id(1)
    chunk = tl.program_id(2)
    begin, end, offs, mask, cm, sm, cm3, sm3 = _tile_setup(rows_ptr, cmat_ptr, smat_ptr, H, W, BR, BC, CB, KRON,
                                                           P, WC)
    active = (n >= begin) & (n < end)
    row_base = n.to(tl.int64) * C * H * W
    c0 = chunk * CS
    c1 = tl.minimum(C, c0 + CS)
    stat_stride = (num_tiles + tl.zeros([], tl.int64)) * 2 * BR * BC  # num_tiles may arrive as constexpr 1
    stat_base = (n.to(tl.int64) * S * num_tiles + tl.program_id(0)) * 2 * BR * BC
    e_idx = tl.arange(0, BR)[:, None] * BC + tl.arange(0, BC)[None, :]
    return active, offs, mask, cm, sm, cm3, sm3, row_base, c0, c1, stat_base, stat_stride, e_idx


# ----------------------------------------------------------------------------------------------
# Kernels. Grid (num_tiles, N, S): S channel chunks of CS channels (S = 1: fused statistics).
# ----------------------------------------------------------------------------------------------

@triton.jit
def _wfa_stats_kernel(q_ptr, k_ptr, stats_ptr, cmat_ptr, smat_ptr, rows_ptr, C, H, W, num_tiles, CS, S,
                      half_inv_pp, BR: tl.constexpr, BC: tl.constexpr, CB: tl.constexpr, KRON: tl.constexpr,
                      P: tl.constexpr, WC: tl.constexpr, PREC: tl.constexpr):
    """Per-chunk (mean, M2) of the convolution over the chunk's channels -> stats workspace."""
    active, offs, mask, cm, sm, cm3, sm3, row_base, c0, c1, stat_base, stat_stride, e_idx = _program(
        rows_ptr, cmat_ptr, smat_ptr, C, H, W, num_tiles, CS, S, BR, BC, CB, KRON, P, WC)
    if active:
        mean, m2 = _chunk_moments(q_ptr, k_ptr, row_base, H * W, offs, mask, c0, c1, cm, sm, cm3, sm3,
                                  half_inv_pp, CB, PREC, KRON)
        base = stat_base + tl.program_id(2) * stat_stride
        tl.store(stats_ptr + base + e_idx, mean)
        tl.store(stats_ptr + base + BR * BC + e_idx, m2)


@triton.jit
def _wfa_fwd_kernel(q_ptr, k_ptr, v_ptr, w_ptr, b_ptr, out_ptr, stats_ptr, cmat_ptr, smat_ptr, rows_ptr,
                    C, H, W, num_tiles, CS, S, half_inv_pp, eps, BR: tl.constexpr, BC: tl.constexpr,
                    CB: tl.constexpr, KRON: tl.constexpr, P: tl.constexpr, WC: tl.constexpr, SPLIT: tl.constexpr,
                    PREC: tl.constexpr):
    active, offs, mask, cm, sm, cm3, sm3, row_base, c0, c1, stat_base, stat_stride, e_idx = _program(
        rows_ptr, cmat_ptr, smat_ptr, C, H, W, num_tiles, CS, S, BR, BC, CB, KRON, P, WC)
    if active:
        HW = H * W
        mean, rstd = _ln_stats(q_ptr, k_ptr, stats_ptr, row_base, stat_base, stat_stride, HW, offs, mask, e_idx,
                               C, CS, S, cm, sm, cm3, sm3, half_inv_pp, eps, BR, BC, CB, SPLIT, PREC, KRON)
        for c in range(c0, c1, CB):
            ch, cmask, boffs, bmask = _block(row_base, HW, offs, mask, c, c1, CB)
            y = _conv_block(q_ptr, k_ptr, boffs, bmask, cm, sm, cm3, sm3, half_inv_pp, PREC, KRON)
            wc = _channel_param(w_ptr, ch, cmask)
            bc = _channel_param(b_ptr, ch, cmask)
            o = ((y - mean[None, :, :]) * rstd[None, :, :] * wc + bc) * _load_f32(v_ptr, boffs, bmask)
            tl.store(out_ptr + boffs, o.to(out_ptr.dtype.element_ty), mask=bmask)


@triton.jit
def _wfa_fwd_oneshot_kernel(q_ptr, k_ptr, v_ptr, w_ptr, b_ptr, out_ptr, cmat_ptr, smat_ptr, rows_ptr, C, H, W,
                            half_inv_pp, eps, BR: tl.constexpr, BC: tl.constexpr, CB: tl.constexpr,
                            KRON: tl.constexpr, P: tl.constexpr, WC: tl.constexpr, PREC: tl.constexpr):
    """All C (<= CB) channels of a tile in one block: one convolution per channel instead of two
    (statistics pass + output pass), q and k read once, exact two-pass moments in registers."""
    active, ch, cmask, boffs, bmask, cm, sm, cm3, sm3 = _oneshot_setup(rows_ptr, cmat_ptr, smat_ptr, C, H, W, BR, BC,
                                                                       CB, KRON, P, WC)
    if active:
        y = _conv_block(q_ptr, k_ptr, boffs, bmask, cm, sm, cm3, sm3, half_inv_pp, PREC, KRON)
        yh, _ = _normalise(y, cmask, C, eps)
        wc = _channel_param(w_ptr, ch, cmask)
        bc = _channel_param(b_ptr, ch, cmask)
        o = (yh * wc + bc) * _load_f32(v_ptr, boffs, bmask)
        tl.store(out_ptr + boffs, o.to(out_ptr.dtype.element_ty), mask=bmask)


@triton.jit
def _normalise(y, cmask, C, eps):
    """LayerNorm over the channel axis (0) of a block holding every channel (masked ones excluded):
    (yh, rstd), yh zero on masked channels; biased variance, two-pass (exact) moments."""
    mean = tl.sum(tl.where(cmask[:, None, None], y, 0.0), axis=0) / C
    d = tl.where(cmask[:, None, None], y - mean[None, :, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    return d * rstd[None, :, :], rstd


@triton.jit
def _wfa_bwd_oneshot_kernel(g_ptr, q_ptr, k_ptr, v_ptr, w_ptr, b_ptr, gq_ptr, gk_ptr, gv_ptr, part_ptr, cmat_ptr,
                            smat_ptr, rows_ptr, C, H, W, num_tiles, half_inv_pp, eps, BR: tl.constexpr,
                            BC: tl.constexpr, CB: tl.constexpr, KRON: tl.constexpr, P: tl.constexpr,
                            WC: tl.constexpr, PREC: tl.constexpr):
    """Backward with all C (<= CB) channels of a tile in one block: one pass instead of three (the
    spectrum of q + ik is computed once and kept), q, k, v, g read once."""
    active, ch, cmask, boffs, bmask, cm, sm, cm3, sm3 = _oneshot_setup(rows_ptr, cmat_ptr, smat_ptr, C, H, W, BR, BC,
                                                                       CB, KRON, P, WC)
    if active:
        zr, zi = _spectrum(_load_f32(q_ptr, boffs, bmask), _load_f32(k_ptr, boffs, bmask), cm, sm, cm3, sm3,
                           PREC, KRON)
        yh, rstd = _normalise(_conv_from_spectrum(zr, zi, cm, sm, cm3, sm3, half_inv_pp, PREC, KRON), cmask, C, eps)
        g = _load_f32(g_ptr, boffs, bmask)
        wc = _channel_param(w_ptr, ch, cmask)
        bc = _channel_param(b_ptr, ch, cmask)
        tl.store(gv_ptr + boffs, (g * (yh * wc + bc)).to(gv_ptr.dtype.element_ty), mask=bmask)
        gz = g * _load_f32(v_ptr, boffs, bmask)
        part_base = (tl.program_id(1).to(tl.int64) * num_tiles + tl.program_id(0)) * 2 * C
        tl.store(part_ptr + part_base + ch, tl.sum(tl.sum(gz * yh, axis=2), axis=1), mask=cmask)
        tl.store(part_ptr + part_base + C + ch, tl.sum(tl.sum(gz, axis=2), axis=1), mask=cmask)
        gyh = gz * wc
        m1 = tl.sum(gyh, axis=0) / C
        m2 = tl.sum(gyh * yh, axis=0) / C
        gy = tl.where(bmask, rstd[None, :, :] * (gyh - m1[None, :, :] - yh * m2[None, :, :]), 0.0)
        gr, gi = _fwd(gy, cm, sm, cm3, sm3, PREC, KRON)
        # r[a] = sum_i gy[i] (q + ik)[i - a] = grad_k + i grad_q = F (Z conj(G)) F / p^2
        rr, ri = _fwd_c(zr * gr + zi * gi, zi * gr - zr * gi, cm, sm, cm3, sm3, PREC, KRON)
        tl.store(gq_ptr + boffs, (ri * (2.0 * half_inv_pp)).to(gq_ptr.dtype.element_ty), mask=bmask)
        tl.store(gk_ptr + boffs, (rr * (2.0 * half_inv_pp)).to(gk_ptr.dtype.element_ty), mask=bmask)


@triton.jit
def _bwd_sums(g_ptr, q_ptr, k_ptr, v_ptr, w_ptr, part_ptr, part_base, row_base, HW, offs, mask, c0, c1, C,
              mean, rstd, cm, sm, cm3, sm3, half_inv_pp, CB: tl.constexpr, PREC: tl.constexpr, KRON: tl.constexpr):
    """Backward pass 2 over channels [c0, c1): per-pixel sums of gyh = g v w and gyh * yh, and the
    per-tile weight/bias partials part[.., 0, c] = sum gz * yh, part[.., 1, c] = sum gz."""
    s1 = tl.zeros_like(mean)
    s2 = tl.zeros_like(mean)
    for c in range(c0, c1, CB):
        ch, cmask, boffs, bmask = _block(row_base, HW, offs, mask, c, c1, CB)
        yh = (_conv_block(q_ptr, k_ptr, boffs, bmask, cm, sm, cm3, sm3, half_inv_pp, PREC, KRON)
              - mean[None, :, :]) * rstd[None, :, :]
        gz = _load_f32(g_ptr, boffs, bmask) * _load_f32(v_ptr, boffs, bmask)
        wc = _channel_param(w_ptr, ch, cmask)
        s1 += tl.sum(gz * wc, axis=0)
        s2 += tl.sum(gz * wc * yh, axis=0)
        tl.store(part_ptr + part_base + ch, tl.sum(tl.sum(gz * yh, axis=2), axis=1), mask=cmask)
        tl.store(part_ptr + part_base + C + ch, tl.sum(tl.sum(gz, axis=2), axis=1), mask=cmask)
    return s1, s2


@triton.jit
def _wfa_bwd_sums_kernel(g_ptr, q_ptr, k_ptr, v_ptr, w_ptr, part_ptr, stats_ptr, sums_ptr, cmat_ptr, smat_ptr,
                         rows_ptr, C, H, W, num_tiles, CS, S, half_inv_pp, eps, BR: tl.constexpr,
                         BC: tl.constexpr, CB: tl.constexpr, KRON: tl.constexpr, P: tl.constexpr, WC: tl.constexpr,
                         PREC: tl.constexpr):
    """Split backward, pass 2: per-chunk channel sums -> sums workspace; weight/bias partials."""
    active, offs, mask, cm, sm, cm3, sm3, row_base, c0, c1, stat_base, stat_stride, e_idx = _program(
        rows_ptr, cmat_ptr, smat_ptr, C, H, W, num_tiles, CS, S, BR, BC, CB, KRON, P, WC)
    if active:
        HW = H * W
        mean, rstd = _ln_stats(q_ptr, k_ptr, stats_ptr, row_base, stat_base, stat_stride, HW, offs, mask, e_idx,
                               C, CS, S, cm, sm, cm3, sm3, half_inv_pp, eps, BR, BC, CB, True, PREC, KRON)
        part_base = (tl.program_id(1).to(tl.int64) * num_tiles + tl.program_id(0)) * 2 * C
        s1, s2 = _bwd_sums(g_ptr, q_ptr, k_ptr, v_ptr, w_ptr, part_ptr, part_base, row_base, HW, offs, mask,
                           c0, c1, C, mean, rstd, cm, sm, cm3, sm3, half_inv_pp, CB, PREC, KRON)
        base = stat_base + tl.program_id(2) * stat_stride
        tl.store(sums_ptr + base + e_idx, s1)
        tl.store(sums_ptr + base + BR * BC + e_idx, s2)


@triton.jit
def _wfa_bwd_kernel(g_ptr, q_ptr, k_ptr, v_ptr, w_ptr, b_ptr, gq_ptr, gk_ptr, gv_ptr, part_ptr, stats_ptr,
                    sums_ptr, cmat_ptr, smat_ptr, rows_ptr, C, H, W, num_tiles, CS, S, half_inv_pp, eps,
                    BR: tl.constexpr, BC: tl.constexpr, CB: tl.constexpr, KRON: tl.constexpr, P: tl.constexpr,
                    WC: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    active, offs, mask, cm, sm, cm3, sm3, row_base, c0, c1, stat_base, stat_stride, e_idx = _program(
        rows_ptr, cmat_ptr, smat_ptr, C, H, W, num_tiles, CS, S, BR, BC, CB, KRON, P, WC)
    if active:
        HW = H * W
        mean, rstd = _ln_stats(q_ptr, k_ptr, stats_ptr, row_base, stat_base, stat_stride, HW, offs, mask, e_idx,
                               C, CS, S, cm, sm, cm3, sm3, half_inv_pp, eps, BR, BC, CB, SPLIT, PREC, KRON)
        if SPLIT:
            m1 = tl.zeros([BR, BC], dtype=tl.float32)
            m2 = tl.zeros([BR, BC], dtype=tl.float32)
            for s in range(0, S):
                base = stat_base + s * stat_stride
                m1 += tl.load(sums_ptr + base + e_idx)
                m2 += tl.load(sums_ptr + base + BR * BC + e_idx)
        else:
            part_base = (tl.program_id(1).to(tl.int64) * num_tiles + tl.program_id(0)) * 2 * C
            m1, m2 = _bwd_sums(g_ptr, q_ptr, k_ptr, v_ptr, w_ptr, part_ptr, part_base, row_base, HW, offs, mask,
                               0, C, C, mean, rstd, cm, sm, cm3, sm3, half_inv_pp, CB, PREC, KRON)
        m1 = (m1 / C)[None, :, :]
        m2 = (m2 / C)[None, :, :]
        mean3 = mean[None, :, :]
        rstd3 = rstd[None, :, :]
        # pass 3: gradients
        for c in range(c0, c1, CB):
            ch, cmask, boffs, bmask = _block(row_base, HW, offs, mask, c, c1, CB)
            q = _load_f32(q_ptr, boffs, bmask)
            k = _load_f32(k_ptr, boffs, bmask)
            g = _load_f32(g_ptr, boffs, bmask)
            wc = _channel_param(w_ptr, ch, cmask)
            bc = _channel_param(b_ptr, ch, cmask)
            zr, zi = _spectrum(q, k, cm, sm, cm3, sm3, PREC, KRON)
            yh = (_conv_from_spectrum(zr, zi, cm, sm, cm3, sm3, half_inv_pp, PREC, KRON) - mean3) * rstd3
            tl.store(gv_ptr + boffs, (g * (yh * wc + bc)).to(gv_ptr.dtype.element_ty), mask=bmask)
            gy = rstd3 * (g * _load_f32(v_ptr, boffs, bmask) * wc - m1 - yh * m2)
            gy = tl.where(bmask, gy, 0.0)
            gr, gi = _fwd(gy, cm, sm, cm3, sm3, PREC, KRON)
            # r[a] = sum_i gy[i] (q + ik)[i - a] = grad_k + i grad_q = F (Z conj(G)) F / p^2
            rr, ri = _fwd_c(zr * gr + zi * gi, zi * gr - zr * gi, cm, sm, cm3, sm3, PREC, KRON)
            tl.store(gq_ptr + boffs, (ri * (2.0 * half_inv_pp)).to(gq_ptr.dtype.element_ty), mask=bmask)
            tl.store(gk_ptr + boffs, (rr * (2.0 * half_inv_pp)).to(gk_ptr.dtype.element_ty), mask=bmask)


# ----------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------

def _check_rows_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                     rows: torch.Tensor, *outs: torch.Tensor) -> None:
    if window_size not in WINDOW_SIZES:
        raise ValueError(f"window_size must be one of {WINDOW_SIZES}, got {window_size!r}")
    if q.dim() != 4:
        raise ValueError(f"q must be (N, C, H, W), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)) + tuple((f"out{i}", o) for i, o in enumerate(outs)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q in shape, dtype and device")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if not q.is_contiguous():
        raise ValueError("q must be contiguous")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported dtype {q.dtype}")
    if rows.dtype != torch.int64 or rows.numel() != 2 or rows.device != q.device:
        raise ValueError("rows must be an int64 tensor of 2 elements on q's device")


def _split(N: int, C: int, tiles: int, device: torch.device, cb: int = 1) -> Tuple[int, int]:
    """(S, CS): split the channels into S chunks of CS (a multiple of the channel block ``cb`` where
    C allows) when tiles * N programs cannot fill the GPU."""
    target = SPLIT_TARGET_PROGRAMS
    if target is None:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    if tiles * N >= target or C == 1:
        return 1, C
    s = min(C, cdiv(target, tiles * N))
    cs = cdiv(C, s)
    if cs > cb:
        cs = cdiv(cs, cb) * cb
    return cdiv(C, cs), cs


def _stats_workspace(N: int, S: int, tiles: int, p: int, device: torch.device) -> torch.Tensor:
    lay = layout(p)
    if S == 1:
        return torch.empty(1, dtype=torch.float32, device=device)  # unused
    return torch.empty((N, S, tiles, 2, lay.br * lay.bc), dtype=torch.float32, device=device)


def window_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int,
                          norm_weight: torch.Tensor, norm_bias: torch.Tensor, eps: float,
                          out: torch.Tensor, rows: torch.Tensor) -> None:
    """Forward on batch rows ``rows[0] <= n < rows[1]`` only, written into ``out``.

    q, k, v, out: (N, C, H, W) contiguous, one dtype; norm_weight, norm_bias: (C,);
    rows: int64 (2,) device tensor [begin, end), never read on the host. Other rows of out untouched.
    """
    _check_rows_args(q, k, v, window_size, rows, out)
    N, C, H, W = q.shape
    if q.numel() == 0:
        return
    p = window_size
    tiles = n_tiles(p, H, W)
    prec = precision(q.dtype, C)
    S, CS = _split(N, C, tiles, q.device, channel_block(p, C, prec))
    cm, sm = dft_matrices(p, q.device)
    w, b = norm_weight.contiguous(), norm_bias.contiguous()
    cb1 = one_shot_channels(p, C, False, prec) if S == 1 else 0
    if cb1:
        _wfa_fwd_oneshot_kernel[(tiles, N)](q, k, v, w, b, out, cm, sm, rows, C, H, W, 0.5 / (p * p), float(eps),
                                            **_constexprs(p, prec, C, cb1), num_warps=ONE_SHOT_WARPS)
        return
    stats = _stats_workspace(N, S, tiles, p, q.device)
    meta = dict(**_constexprs(p, prec, C), num_warps=_num_warps(p))
    common = (C, H, W, tiles, CS, S, 0.5 / (p * p))
    if S > 1:
        _wfa_stats_kernel[(tiles, N, S)](q, k, stats, cm, sm, rows, *common, **meta)
    _wfa_fwd_kernel[(tiles, N, S)](q, k, v, w, b, out, stats, cm, sm, rows, *common, float(eps),
                                   SPLIT=S > 1, **meta)


def window_attention_rows_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   window_size: int, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                                   eps: float, grad_q: torch.Tensor, grad_k: torch.Tensor,
                                   grad_v: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward on batch rows ``rows[0] <= n < rows[1]`` only.

    Writes those rows of grad_q, grad_k, grad_v (preallocated, shaped like q) and returns
    (grad_norm_weight, grad_norm_bias), float32 (C,), summed over those rows only.
    """
    _check_rows_args(q, k, v, window_size, rows, grad, grad_q, grad_k, grad_v)
    N, C, H, W = q.shape
    p = window_size
    tiles = n_tiles(p, H, W)
    # zero-filled: rows outside [begin, end) keep zero partials (no host read of rows)
    part = torch.zeros((N, tiles, 2, C), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return part[:, :, 0].sum((0, 1)), part[:, :, 1].sum((0, 1))
    prec = precision(q.dtype, C)
    S, CS = _split(N, C, tiles, q.device, channel_block(p, C, prec))
    cm, sm = dft_matrices(p, q.device)
    w, b = norm_weight.contiguous(), norm_bias.contiguous()
    cb1 = one_shot_channels(p, C, True, prec) if S == 1 else 0
    if cb1:
        _wfa_bwd_oneshot_kernel[(tiles, N)](grad, q, k, v, w, b, grad_q, grad_k, grad_v, part, cm, sm, rows, C, H,
                                            W, tiles, 0.5 / (p * p), float(eps), **_constexprs(p, prec, C, cb1),
                                            num_warps=ONE_SHOT_WARPS)
        return part[:, :, 0].sum((0, 1)), part[:, :, 1].sum((0, 1))
    stats = _stats_workspace(N, S, tiles, p, q.device)
    sums = _stats_workspace(N, S, tiles, p, q.device)
    meta = dict(**_constexprs(p, prec, C), num_warps=_num_warps(p))
    common = (C, H, W, tiles, CS, S, 0.5 / (p * p))
    grid = (tiles, N, S)
    if S > 1:
        _wfa_stats_kernel[grid](q, k, stats, cm, sm, rows, *common, **meta)
        _wfa_bwd_sums_kernel[grid](grad, q, k, v, w, part, stats, sums, cm, sm, rows, *common, float(eps), **meta)
    _wfa_bwd_kernel[grid](grad, q, k, v, w, b, grad_q, grad_k, grad_v, part, stats, sums, cm, sm, rows,
                          *common, float(eps), SPLIT=S > 1, **meta)
    return part[:, :, 0].sum((0, 1)), part[:, :, 1].sum((0, 1))


register_all("triton", window_attention_implementations(window_attention_rows, window_attention_rows_backward),
             dtypes=FP32_AND_16BIT)
