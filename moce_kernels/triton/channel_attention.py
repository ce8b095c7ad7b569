"""Triton channel ("transposed") attention with the output 1x1 and the residual folded in.

Semantics: :mod:`moce_kernels.ops.channel_attention`. Per image b and head h (c channels, N = H * W):
``A = softmax(G / (max(|q_i|, eps) max(|k_j|, eps)) * t_h)`` with ``G = q_h k_h^T``, and
``out[b] = M_b v[b] + bias + residual[b]`` with ``M_b = W_o blockdiag(A_b)`` (C_out x C).

Forward, 3 launches:
  _gram_kernel (diagonal mode)  grid (B * heads, S): per head, partial ``q k^T`` (c x c) and the squared
                                row norms of q and k over one of S pixel chunks; q and k are read once.
  _attn_fwd_kernel              grid (B * heads): sums the S partials in a fixed order (deterministic, no
                                atomics), the c x c softmax in fp32 (fp64 for fp64 inputs), and the fold
                                ``M_b[:, head] = W_o[:, head] A_h``.
  _gemm_kernel                  grid (N tiles, C_out blocks, B): ``out = M_b v + bias + residual``; v and
                                the residual are read once, out written once.
Backward (g = grad of out), 7 launches, no atomics: _gram_kernel + _attn_fwd_kernel again (recompute A,
M from q, k); _gemm_kernel ``grad_v = M_b^T g``; _gram_kernel (full mode) partial ``P_b = g v^T`` (C_out x
C) and row sums of g; _attn_bwd_kernel per (b, h): reduce P (fixed order), ``gA = W_o[:, h]^T P_b[:, h]``,
softmax backward, ``D = t dS / (|q_i| |k_j|)`` (kept as its two one-sided scalings), the norm terms,
the temperature partial; _wgrad_kernel per (C_out block, head): ``grad_W = sum_b P_b A_b^T``,
grad_bias, grad_t summed over b in a fixed order; _qk_grad_kernel ``grad_q = D k + a_q q``,
``grad_k = D^T q + a_k k``. The residual's gradient is g itself (no kernel).

Traffic, per call, in units of one activation (B x C x N elements of s bytes), C_out = C, with the
residual (encoder blocks, CrossAttention); the partials (B heads S (c^2 + 2c) fp32 words) and M
(B C_out C elements) are small beside it. Eager = the model's ops, counted at the dispatcher (each op
reading its inputs and writing its outputs once; 64 x 64, C = 48):
  forward   eager: 12 ops (norm, clamp_min, div for each of q and k; bmm, mul, softmax, bmm, conv,
            add), 15 activations (each normalize reads its input twice and writes it once; the bmms,
            conv and add read and write whole activations). Fused: 3 launches, 5 activations (read q,
            k, v, residual; write out).
  FLOPs     per image, eager 2cCN (Gram) + 2cCN (A v) + 2C^2 N (conv) + ~7CN (norms, divides, add);
            fused 2cCN + 2C^2 N + ~6CN, plus the fold, 2 C^2 c: the A v product disappears into the
            projection.
  backward  eager autograd: 38 ops, 59 activations (6 of them the cat that assembles the packed qkv
            gradient). Fused: 7 launches, 10 activations (read q, k twice, g twice, v once; write
            grad_q, grad_k, grad_v) plus the same cat, which autograd adds for chunked q, k, v (a custom
            op's outputs cannot alias one another, so it cannot write the packed gradient itself). The
            full-mode Gram re-reads each 64-row block of g and v once per block of the other
            operand, from L2.
Counted, not timed: no GPU measured these kernels. The split count S is a guess to fill the GPU
(about 2 programs per SM, chunks of at least MIN_SPLIT_PIXELS pixels); on the CPU (interpreter,
tests) it splits as finely as CPU_TARGET_PROGRAMS allows so that the two-stage reduction is exercised.

Stride contract: q, k, v, residual and grad need contiguous (H, W) planes; batch and channel
strides are free (channel chunks of one packed tensor are read in place). Outputs are contiguous.
Precision: 16-bit inputs multiply on tensor cores with fp32 accumulation. The pixel-sized products
take 16-bit operands (M, and D's one-sided scalings, are rounded to the input dtype); the softmax and
everything c x c stays fp32, and the small products with fp32 operands (the fold W_o A, gA, grad_W)
run as three bfloat16 products of their hi/lo halves (_mm_small, about 16 significant bits). fp32
and fp64 inputs use exact ("ieee") dots throughout, on FMA units, in blocks of FMA_BLOCK rows or
pixels where 64 would spill.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backends import register
from ..outputs import new_output
from .expert_conv import _mm
from ._host import cdiv, next_power_of_2

BLOCK_N = 64        # pixels per tile of the Gram and GEMM passes, and of the q, k gradient on tensor cores
BLOCK_O = 64        # rows per block of the GEMM, and of the fold, gA and grad_W on tensor cores
BLOCK_K = 32        # reduction step of the GEMM
BLOCK_F = 64        # square tile of the full-mode Gram g v^T
FMA_BLOCK = 16      # BLOCK_O and the q, k gradient's BLOCK_N for exact (FMA) dots
MIN_SPLIT_PIXELS = 4096
CPU_TARGET_PROGRAMS = 16


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ieee(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64)


def _dot_block(dtype: torch.dtype, block: int) -> int:
    """``block`` where the dots run on tensor cores (16-bit inputs); FMA_BLOCK for the exact FMA dots of
    fp32 and fp64 inputs, whose operand layouts hold whole rows per thread and spill at 64 on sm_90
    (benchmarks/static_report.py --family channel_attention --dtype float32)."""
    return FMA_BLOCK if _ieee(dtype) else block


def _warps(blk: int) -> int:
    """Warps for a program holding several blk x blk fp32 tiles: 8 past 32, so that they fit in registers."""
    return 8 if blk > 32 else 4


def head_block(c: int) -> int:
    """Tile edge for a head of c channels: a power of two >= 16 (tl.dot's minimum)."""
    return max(16, next_power_of_2(c))


def splits(groups: int, N: int, device: torch.device) -> Tuple[int, int]:
    """(S, chunk): the N pixels cut into S chunks of ``chunk`` (a multiple of BLOCK_N) so that
    ``groups * S`` programs fill the device."""
    tiles = cdiv(N, BLOCK_N)
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        most = cdiv(N, MIN_SPLIT_PIXELS)
    else:
        target, most = CPU_TARGET_PROGRAMS, tiles
    s = max(1, min(most, cdiv(target, groups)))
    chunk = cdiv(tiles, s) * BLOCK_N
    return cdiv(N, chunk), chunk


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _split_bf16(x):
    """An fp32 tile as hi + lo, two bfloat16 tiles (hi = x rounded, lo = the rest rounded): about 16
    significant bits of x, with fp32's range."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(x.dtype)).to(tl.bfloat16)


@triton.jit
def _mm_small(a, b, IEEE: tl.constexpr):
    """``a @ b`` for the fp32 (fp64) operands of the c x c-sized products (the fold, gA, grad_W): exact
    dots when IEEE, else on tensor cores as three bfloat16 products with fp32 accumulation,
    ``hi_a hi_b + (hi_a lo_b + lo_a hi_b)`` (Triton's "bf16x3", written out so that the interpreter
    computes the same roundings): a relative error near 2^-16, far below the 16-bit rounding of
    the results."""
    if IEEE:
        return _mm(a, b, True)
    else:
        ah, al = _split_bf16(a)
        bh, bl = _split_bf16(b)
        return _mm(ah, bh, False) + (_mm(ah, bl, False) + _mm(al, bh, False))


@triton.jit
def _gram_kernel(x_ptr, y_ptr, part_ptr, sums_ptr, R, C, N, chunk, sxb, sxc, syb, syc, n_rb, n_cb, step,
                 DIAG: tl.constexpr, BLK: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Partial ``X Y^T`` over pixel chunk s of image b, for a (rows, cols) block of ``step`` x ``step``.

    DIAG (per head, step = c, col block = row block): part (B, S, heads, c, c); sums (B, S, heads, 2, c)
    the squared row norms of X and Y. Full: part (B, S, R, C); sums (B, S, R) the row sums of X
    (written by the programs of column block 0).
    """
    pid = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    cb = pid % n_cb
    rest = pid // n_cb
    rb = rest % n_rb
    b = rest // n_rb
    if DIAG:
        cb = rb
    i = tl.arange(0, BLK)
    rows = rb * step + i
    cols = cb * step + i
    rmask = (i < step) & (rows < R)
    cmask = (i < step) & (cols < C)
    xrow = x_ptr + b.to(tl.int64) * sxb + rows.to(tl.int64) * sxc
    yrow = y_ptr + b.to(tl.int64) * syb + cols.to(tl.int64) * syc
    ACC = part_ptr.dtype.element_ty
    acc = tl.zeros([BLK, BLK], dtype=ACC)
    xs = tl.zeros([BLK], dtype=ACC)
    ys = tl.zeros([BLK], dtype=ACC)
    for n0 in range(0, chunk, BN):
        n = s * chunk + n0 + tl.arange(0, BN)
        nm = n < N
        xt = tl.load(xrow[:, None] + n[None, :], mask=rmask[:, None] & nm[None, :], other=0.0)
        yt = tl.load(yrow[:, None] + n[None, :], mask=cmask[:, None] & nm[None, :], other=0.0)
        acc += _mm(xt, tl.trans(yt), IEEE)
        xf = xt.to(ACC)
        if DIAG:
            yf = yt.to(ACC)
            xs += tl.sum(xf * xf, 1)
            ys += tl.sum(yf * yf, 1)
        else:
            xs += tl.sum(xf, 1)
    m2 = rmask[:, None] & cmask[None, :]
    if DIAG:
        base = (b * S + s) * n_rb + rb
        tl.store(part_ptr + base * step * step + i[:, None] * step + i[None, :], acc, mask=m2)
        tl.store(sums_ptr + base * 2 * step + i, xs, mask=rmask)
        tl.store(sums_ptr + base * 2 * step + step + i, ys, mask=rmask)
    else:
        row_base = (b * S + s).to(tl.int64) * R + rows
        tl.store(part_ptr + row_base[:, None] * C + cols[None, :], acc, mask=m2)
        if cb == 0:
            tl.store(sums_ptr + row_base, xs, mask=rmask)


@triton.jit
def _attention(part_ptr, sums_ptr, t_ptr, b, h, S, heads, c, eps, BC: tl.constexpr):
    """Sum the S Gram partials of (b, h) in order; returns (A, Gh, r, s, |q_i| >= eps, |k_j| >= eps, t)
    with r = 1 / max(|q_i|, eps), s likewise for k, Gh = diag(r) G diag(s), A = softmax(t Gh); rows and
    columns past c are zero in A and Gh."""
    i = tl.arange(0, BC)
    im = i < c
    m2 = im[:, None] & im[None, :]
    ACC = part_ptr.dtype.element_ty
    g = tl.zeros([BC, BC], dtype=ACC)
    nq = tl.zeros([BC], dtype=ACC)
    nk = tl.zeros([BC], dtype=ACC)
    for si in range(S):
        base = (b * S + si) * heads + h
        g += tl.load(part_ptr + base * c * c + i[:, None] * c + i[None, :], mask=m2, other=0.0)
        nq += tl.load(sums_ptr + base * 2 * c + i, mask=im, other=0.0)
        nk += tl.load(sums_ptr + base * 2 * c + c + i, mask=im, other=0.0)
    nq = tl.sqrt(nq)
    nk = tl.sqrt(nk)
    r = 1.0 / tl.maximum(nq, eps)
    sk = 1.0 / tl.maximum(nk, eps)
    gh = g * r[:, None] * sk[None, :]
    t = tl.load(t_ptr + h).to(ACC)
    logits = tl.where(im[None, :], gh * t, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 1)[:, None])
    a = tl.where(im[:, None], p / tl.sum(p, 1)[:, None], 0.0)
    return a, gh, r, sk, nq >= eps, nk >= eps, t


@triton.jit
def _head_cols(rows, h, c, C, i):
    """Offsets of the columns of head h (``h * c + i``) in the given rows of a matrix with C columns."""
    return rows[:, None].to(tl.int64) * C + h * c + i[None, :]


@triton.jit
def _head_weight(w_ptr, o0, h, c, C, C_out, dtype, BO: tl.constexpr, BC: tl.constexpr):
    """Rows o0 .. o0 + BO of W_o's columns of head h, in ``dtype``: (rows, mask, tile (BO, BC))."""
    o = o0 + tl.arange(0, BO)
    i = tl.arange(0, BC)
    m2 = (o < C_out)[:, None] & (i < c)[None, :]
    return o, m2, tl.load(w_ptr + _head_cols(o, h, c, C, i), mask=m2, other=0.0).to(dtype)


@triton.jit
def _attn_fwd_kernel(part_ptr, sums_ptr, t_ptr, w_ptr, m_ptr, S, heads, c, C, C_out, eps,
                     BC: tl.constexpr, BO: tl.constexpr, IEEE: tl.constexpr):
    """Per (b, h): A from the partials, then ``M[b, :, head] = W_o[:, head] A`` (M: (B, C_out, C), in the
    inputs' dtype: the GEMMs multiply it at that precision)."""
    pid = tl.program_id(0)
    b = pid // heads
    h = pid % heads
    a, gh, r, sk, vq, vk, t = _attention(part_ptr, sums_ptr, t_ptr, b, h, S, heads, c, eps, BC)
    i = tl.arange(0, BC)
    for o0 in range(0, C_out, BO):
        o, m2, w = _head_weight(w_ptr, o0, h, c, C, C_out, a.dtype, BO, BC)
        m = _mm_small(w, a, IEEE)
        tl.store(m_ptr + _head_cols(b * C_out + o, h, c, C, i), m.to(m_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _gemm_kernel(m_ptr, x_ptr, bias_ptr, res_ptr, out_ptr, R, K, N, smb, smr, smk, sxb, sxc, srb, src,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BO: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, IEEE: tl.constexpr):
    """``out[b] = M_b X_b (+ bias) (+ res[b])``: M (B, R, K) by strides, in X's dtype; X (B, K, N) and res
    (B, R, N) with contiguous rows of N; out (B, R, N) contiguous."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    r = tl.program_id(1) * BO + tl.arange(0, BO)
    b = tl.program_id(2).to(tl.int64)
    nm = n < N
    rm = r < R
    if IEEE:
        acc = tl.zeros([BO, BN], dtype=m_ptr.dtype.element_ty)
    else:
        acc = tl.zeros([BO, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        km = kk < K
        mt = tl.load(m_ptr + b * smb + r[:, None] * smr + kk[None, :] * smk, mask=rm[:, None] & km[None, :],
                     other=0.0)
        xt = tl.load(x_ptr + b * sxb + kk[:, None].to(tl.int64) * sxc + n[None, :], mask=km[:, None] & nm[None, :],
                     other=0.0)
        acc += _mm(mt, xt, IEEE)
    m2 = rm[:, None] & nm[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r, mask=rm, other=0.0).to(acc.dtype)[:, None]
    if HAS_RES:
        acc += tl.load(res_ptr + b * srb + r[:, None].to(tl.int64) * src + n[None, :], mask=m2, other=0.0).to(acc.dtype)
    tl.store(out_ptr + (b * R + r[:, None]) * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _attn_bwd_kernel(part_ptr, sums_ptr, t_ptr, w_ptr, ppart_ptr, pred_ptr, dq_ptr, dk_ptr, scale_ptr, a_ptr, gt_ptr,
                     S, S2, heads, c, C, C_out, eps, BC: tl.constexpr, BO: tl.constexpr, IEEE: tl.constexpr):
    """Per (b, h): P_b[:, head] = sum of the S2 partials of g v^T (stored to pred (B, C_out, C)),
    ``gA = W_o[:, head]^T P_b[:, head]``, ``dS = A * (gA - rowsum(gA * A))``; stores D = t dS r s^T and A
    ((B, heads, BC, BC), zero-padded) as ``Dq = t dS diag(s)`` and ``Dk = t dS^T diag(r)`` (so that
    D k = diag(r) Dq k and D^T q = diag(s) Dk q keep 16-bit operands away from underflow), scales
    (r, s, a_q, a_k) (B, heads, 4, BC), A, and sum(dS * Gh) to gt (B, heads)."""
    pid = tl.program_id(0)
    b = pid // heads
    h = pid % heads
    i = tl.arange(0, BC)
    ACC = part_ptr.dtype.element_ty
    ga = tl.zeros([BC, BC], dtype=ACC)
    for o0 in range(0, C_out, BO):  # gA first: A's tiles are not live across this loop
        o, m2, w = _head_weight(w_ptr, o0, h, c, C, C_out, ACC, BO, BC)
        p = tl.zeros([BO, BC], dtype=ACC)
        for si in range(S2):
            p += tl.load(ppart_ptr + _head_cols((b * S2 + si) * C_out + o, h, c, C, i), mask=m2, other=0.0)
        tl.store(pred_ptr + _head_cols(b * C_out + o, h, c, C, i), p, mask=m2)
        ga += _mm_small(tl.trans(w), p, IEEE)
    a, gh, r, sk, vq, vk, t = _attention(part_ptr, sums_ptr, t_ptr, b, h, S, heads, c, eps, BC)
    ds = a * (ga - tl.sum(ga * a, 1)[:, None])
    e = t * ds * gh
    base = b * heads + h
    tile = base * BC * BC + i[:, None] * BC + i[None, :]
    tl.store(dq_ptr + tile, t * ds * sk[None, :])
    tl.store(dk_ptr + tile, tl.trans(t * ds * r[:, None]))
    tl.store(a_ptr + tile, a)
    sc = scale_ptr + base * 4 * BC + i
    tl.store(sc, r)
    tl.store(sc + BC, sk)
    tl.store(sc + 2 * BC, -(r * r) * tl.where(vq, tl.sum(e, 1), 0.0))
    tl.store(sc + 3 * BC, -(sk * sk) * tl.where(vk, tl.sum(e, 0), 0.0))
    tl.store(gt_ptr + base, tl.sum(tl.sum(ds * gh, 1), 0))


@triton.jit
def _wgrad_kernel(pred_ptr, a_ptr, bsum_ptr, gtp_ptr, gw_ptr, gb_ptr, gt_ptr, B, S2, heads, c, C, C_out,
                  BC: tl.constexpr, BO: tl.constexpr, IEEE: tl.constexpr):
    """Per (C_out block, head): ``grad_W[o, head] = sum_b P_b[o, head] A_bh^T``; head 0 also sums the
    row-sum partials into grad_bias, block 0 the temperature partials into grad_t (fixed orders)."""
    ob = tl.program_id(0)
    h = tl.program_id(1)
    o = ob * BO + tl.arange(0, BO)
    om = o < C_out
    i = tl.arange(0, BC)
    m2 = om[:, None] & (i < c)[None, :]
    ACC = pred_ptr.dtype.element_ty
    acc = tl.zeros([BO, BC], dtype=ACC)
    for b in range(B):
        p = tl.load(pred_ptr + _head_cols(b * C_out + o, h, c, C, i), mask=m2, other=0.0)
        a = tl.load(a_ptr + ((b * heads + h) * BC + i[:, None]) * BC + i[None, :])
        acc += _mm_small(p, tl.trans(a), IEEE)
    tl.store(gw_ptr + _head_cols(o, h, c, C, i), acc.to(gw_ptr.dtype.element_ty), mask=m2)
    if h == 0:
        gb = tl.zeros([BO], dtype=ACC)
        for j in range(B * S2):
            gb += tl.load(bsum_ptr + j * C_out + o, mask=om, other=0.0)
        tl.store(gb_ptr + o, gb.to(gb_ptr.dtype.element_ty), mask=om)
    if ob == 0:
        gt = tl.load(gtp_ptr + h)
        for b in range(1, B):
            gt += tl.load(gtp_ptr + b * heads + h)
        tl.store(gt_ptr + h, gt.to(gt_ptr.dtype.element_ty))


@triton.jit
def _qk_grad_kernel(q_ptr, k_ptr, dq_ptr, dk_ptr, scale_ptr, gq_ptr, gk_ptr, heads, c, C, N, sqb, sqc, skb, skc,
                    BC: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Per (b, h, pixel tile): ``grad_q = r * (Dq k) + a_q q``, ``grad_k = s * (Dk q) + a_k k`` (outputs
    contiguous; Dq, Dk rounded to the inputs' dtype for 16-bit inputs)."""
    pid = tl.program_id(0)
    b = pid // heads
    h = pid % heads
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    i = tl.arange(0, BC)
    rows = (h * c + i).to(tl.int64)
    m2 = (i < c)[:, None] & (n < N)[None, :]
    base = b * heads + h
    tile = base * BC * BC + i[:, None] * BC + i[None, :]
    sc = scale_ptr + base * 4 * BC + i
    qt = tl.load(q_ptr + b.to(tl.int64) * sqb + rows[:, None] * sqc + n[None, :], mask=m2, other=0.0)
    kt = tl.load(k_ptr + b.to(tl.int64) * skb + rows[:, None] * skc + n[None, :], mask=m2, other=0.0)
    dq = tl.load(dq_ptr + tile).to(qt.dtype)
    dk = tl.load(dk_ptr + tile).to(qt.dtype)
    ACC = scale_ptr.dtype.element_ty
    gq = tl.load(sc)[:, None] * _mm(dq, kt, IEEE) + tl.load(sc + 2 * BC)[:, None] * qt.to(ACC)
    gk = tl.load(sc + BC)[:, None] * _mm(dk, qt, IEEE) + tl.load(sc + 3 * BC)[:, None] * kt.to(ACC)
    out = (b.to(tl.int64) * C + rows[:, None]) * N + n[None, :]
    tl.store(gq_ptr + out, gq.to(gq_ptr.dtype.element_ty), mask=m2)
    tl.store(gk_ptr + out, gk.to(gk_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------------------------
# Launch wrappers
# ----------------------------------------------------------------------------------------------

def _check_planes(**tensors: Optional[torch.Tensor]) -> None:
    """The kernels' stride contract: every (H, W) plane contiguous (batch and channel strides free)."""
    for name, t in tensors.items():
        if t is None:
            continue
        H, W = t.shape[2], t.shape[3]
        if not ((t.stride(3) == 1 or W == 1) and (t.stride(2) == W or H == 1)):
            raise ValueError(f"{name} (shape {tuple(t.shape)}, strides {t.stride()}) must have contiguous "
                             "(H, W) planes")


def _fold(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor, w2d: torch.Tensor, eps: float):
    """Pass 1 and the softmax: returns (M (B, C_out, C), Gram partials, norm partials, S)."""
    B, C, H, W = q.shape
    heads, c_out, N = temperature.shape[0], w2d.shape[0], H * W
    c = C // heads
    bc, acc, ieee, dev = head_block(c), _acc_dtype(q.dtype), _ieee(q.dtype), q.device
    S, chunk = splits(B * heads, N, dev)
    part = new_output((B, S, heads, c, c), acc, dev)
    sums = new_output((B, S, heads, 2, c), acc, dev)
    _gram_kernel[(B * heads, S)](q, k, part, sums, C, C, N, chunk, q.stride(0), q.stride(1), k.stride(0),
                                 k.stride(1), heads, 1, c, DIAG=True, BLK=bc, BN=BLOCK_N, IEEE=ieee,
                                 num_warps=_warps(bc) if ieee else 4)
    m = new_output((B, c_out, C), acc if ieee else q.dtype, dev)
    _attn_fwd_kernel[(B * heads,)](part, sums, temperature, w2d, m, S, heads, c, C, c_out, float(eps), BC=bc,
                                   BO=_dot_block(q.dtype, BLOCK_O), IEEE=ieee)
    return m, part, sums, S


def _gemm(m: torch.Tensor, m_strides: Tuple[int, int, int], x: torch.Tensor, out: torch.Tensor,
          bias: Optional[torch.Tensor] = None, res: Optional[torch.Tensor] = None) -> None:
    """``out[b] = M_b x[b] (+ bias) (+ res[b])`` with M given by (batch, row, col) strides."""
    B, R = out.shape[0], out.shape[1]
    K, N = x.shape[1], out.shape[2] * out.shape[3]
    grid = (cdiv(N, BLOCK_N), cdiv(R, BLOCK_O), B)
    _gemm_kernel[grid](m, x, m if bias is None else bias, out if res is None else res, out, R, K, N, *m_strides,
                       x.stride(0), x.stride(1), 0 if res is None else res.stride(0),
                       0 if res is None else res.stride(1), HAS_BIAS=bias is not None, HAS_RES=res is not None,
                       BO=BLOCK_O, BN=BLOCK_N, BK=BLOCK_K, IEEE=_ieee(x.dtype))


@register("channel_attention", "triton")
def _forward(q, k, v, temperature, proj_weight, proj_bias, residual, eps):
    _check_planes(q=q, k=k, v=v, residual=residual)
    B, C, H, W = q.shape
    c_out = proj_weight.shape[0]
    m, *_ = _fold(q, k, temperature, proj_weight.reshape(c_out, C), eps)
    out = new_output((B, c_out, H, W), q.dtype, q.device)
    _gemm(m, m.stride(), v, out, proj_bias, residual)
    return out


@register("channel_attention_backward", "triton")
def _backward(grad, q, k, v, temperature, proj_weight, eps):
    _check_planes(grad=grad, q=q, k=k, v=v)
    B, C, H, W = q.shape
    heads, c_out, N, dev = temperature.shape[0], proj_weight.shape[0], H * W, q.device
    c, bc, acc, ieee = C // heads, head_block(C // heads), _acc_dtype(q.dtype), _ieee(q.dtype)
    bo, bn = _dot_block(q.dtype, BLOCK_O), _dot_block(q.dtype, BLOCK_N)
    w2d = proj_weight.reshape(c_out, C)
    m, part, sums, S = _fold(q, k, temperature, w2d, eps)
    gv = new_output(v.shape, v.dtype, dev)
    _gemm(m, (m.stride(0), m.stride(2), m.stride(1)), grad, gv)
    n_rb, n_cb = cdiv(c_out, BLOCK_F), cdiv(C, BLOCK_F)
    S2, chunk2 = splits(B * n_rb * n_cb, N, dev)
    ppart = new_output((B, S2, c_out, C), acc, dev)
    bsum = new_output((B, S2, c_out), acc, dev)
    _gram_kernel[(B * n_rb * n_cb, S2)](grad, v, ppart, bsum, c_out, C, N, chunk2, grad.stride(0), grad.stride(1),
                                        v.stride(0), v.stride(1), n_rb, n_cb, BLOCK_F, DIAG=False, BLK=BLOCK_F,
                                        BN=BLOCK_N, IEEE=ieee, num_warps=_warps(BLOCK_F) if ieee else 4)
    pred = new_output((B, c_out, C), acc, dev)
    dq, dk, amat = (new_output((B, heads, bc, bc), acc, dev) for _ in range(3))
    scales = new_output((B, heads, 4, bc), acc, dev)
    gtp = new_output((B, heads), acc, dev)
    _attn_bwd_kernel[(B * heads,)](part, sums, temperature, w2d, ppart, pred, dq, dk, scales, amat, gtp, S, S2,
                                   heads, c, C, c_out, float(eps), BC=bc, BO=bo, IEEE=ieee,
                                   num_warps=_warps(bc))
    gw = new_output(proj_weight.shape, proj_weight.dtype, dev)
    gb = new_output((c_out,), proj_weight.dtype, dev)
    gt = new_output(temperature.shape, temperature.dtype, dev)
    _wgrad_kernel[(cdiv(c_out, bo), heads)](pred, amat, bsum, gtp, gw, gb, gt, B, S2, heads, c, C, c_out,
                                                    BC=bc, BO=bo, IEEE=ieee, num_warps=_warps(bc))
    gq = new_output(q.shape, q.dtype, dev)
    gk = new_output(k.shape, k.dtype, dev)
    _qk_grad_kernel[(B * heads, cdiv(N, bn))](q, k, dq, dk, scales, gq, gk, heads, c, C, N, q.stride(0),
                                                     q.stride(1), k.stride(0), k.stride(1), BC=bc, BN=bn, IEEE=ieee)
    return gq, gk, gv, gt, gw, gb
