"""Triton kernels for routed expert dispatch: router (pool, linear, noise, softmax, top-k, aux loss),
device-side dispatch (counting sort of slots by expert) and the deterministic gated combine.

No kernel here reads data back to the host: every grid and buffer is sized from shapes (B, C, H, W,
k, E), never from the routing, so a forward can be captured in a CUDA graph.

Router pipeline (forward and backward):
  1. ``_pool_partial_kernel``: one pass over x (B, C, H*W); grid (B*C, S) writes fp32 partial sums
     ``part`` (B*C, S) of S contiguous chunks of each row (deterministic, no atomics).
  2. ``_route_head_kernel`` (one program): pooled = sum(part)/HW, logits, softmax, top-k, aux loss.
     ``_route_head_bwd_kernel`` (one program): the same recomputation, then dlogits and the grads of
     the two linear maps, freq_emb and pooled.
  3. backward only: ``_broadcast_rows_kernel`` writes grad_x[b, c, :] = grad_pooled[b, c] / HW.
Registered for float32, float16 and bfloat16 (the kernels compute in fp32); float64 calls run the
reference (:func:`moce_kernels.backends.resolve`).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..backends import FP32_AND_16BIT, register
from ..outputs import new_output
from ._host import cdiv, next_power_of_2

_TARGET_PROGRAMS = 2048  # pool grid size to aim for (fills an H200's 132 SMs many times over)
_POOL_BLOCK = 1024
_MAX_SPLIT = 256


def _np2(n: int) -> int:
    return next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------- pool
@triton.jit
def _pool_partial_kernel(x_ptr, part_ptr, HW, CHUNK, SPLIT, BLOCK: tl.constexpr):
    """part[row, s] = sum(x[row, s*CHUNK : min((s+1)*CHUNK, HW)]) in fp32; CHUNK % BLOCK == 0."""
    row = tl.program_id(0)
    s = tl.program_id(1)
    base = row.to(tl.int64) * HW
    start = s.to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + base + idx, mask=idx < HW, other=0.0).to(tl.float32)
    tl.store(part_ptr + row.to(tl.int64) * SPLIT + s, tl.sum(acc, axis=0))


def _pool_partials(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(B*C, S) fp32 partial row sums of x (B, C, H, W) and S."""
    B, C, H, W = x.shape
    HW, rows = H * W, B * C
    max_split = max(1, cdiv(HW, _POOL_BLOCK))
    split = max(1, min(_MAX_SPLIT, max_split, cdiv(_TARGET_PROGRAMS, rows)))
    chunk = cdiv(cdiv(HW, split), _POOL_BLOCK) * _POOL_BLOCK
    split = cdiv(HW, chunk)
    part = torch.empty((rows, split), dtype=torch.float32, device=x.device)  # scratch, fully written
    _pool_partial_kernel[(rows, split)](x, part, HW, chunk, split, BLOCK=_POOL_BLOCK)
    return part, split


# ----------------------------------------------------------------------------- router head helpers
@triton.jit
def _logits_tile(part_ptr, fe_ptr, gw_ptr, fw_ptr, B, C, F, SPLIT, inv_hw,
                 BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, E):
    """(BLOCK_B, BLOCK_E) fp32 logits = mean_HW(x) @ gw^T + fe @ fw^T (zeros outside B x E)."""
    ob = tl.arange(0, BLOCK_B)
    oe = tl.arange(0, BLOCK_E)
    oc = tl.arange(0, BLOCK_C)
    bm = ob < B
    em = oe < E
    logits = tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + oc
        cm = c < C
        m2 = bm[:, None] & cm[None, :]
        rows = (ob[:, None] * C + c[None, :]).to(tl.int64) * SPLIT
        pooled = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for s in range(0, SPLIT):
            pooled += tl.load(part_ptr + rows + s, mask=m2, other=0.0)
        pooled = pooled * inv_hw
        w = tl.load(gw_ptr + oe[:, None] * C + c[None, :], mask=em[:, None] & cm[None, :], other=0.0).to(tl.float32)
        logits += tl.sum(pooled[:, None, :] * w[None, :, :], axis=2)
    for f0 in range(0, F, BLOCK_C):
        f = f0 + oc
        fm = f < F
        v = tl.load(fe_ptr + ob[:, None] * F + f[None, :], mask=bm[:, None] & fm[None, :], other=0.0).to(tl.float32)
        w = tl.load(fw_ptr + oe[:, None] * F + f[None, :], mask=em[:, None] & fm[None, :], other=0.0).to(tl.float32)
        logits += tl.sum(v[:, None, :] * w[None, :, :], axis=2)
    return logits


@triton.jit
def _row_softmax(v, em):
    """Softmax over axis 1 of a (BLOCK_B, BLOCK_E) tile, columns outside ``em`` excluded (set to 0)."""
    v = tl.where(em[None, :], v, float("-inf"))
    mx = tl.max(v, axis=1)
    p = tl.exp(v - mx[:, None])
    p = tl.where(em[None, :], p, 0.0)
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _largest(v, avail, oe, BLOCK_E: tl.constexpr):
    """Column of each row's largest available value: NaN ranks above every number, ties go to the
    lower index (every row has an available column)."""
    nan = avail & (v != v)
    first_nan = tl.min(tl.where(nan, oe, BLOCK_E), axis=1)
    num = avail & (v == v)
    top = tl.max(tl.where(num, v, float("-inf")), axis=1)
    first_top = tl.min(tl.where(num & (v == top[:, None]), oe, BLOCK_E), axis=1)
    return tl.where(first_nan < BLOCK_E, first_nan, first_top)


@triton.jit
def _kth_choice(v, em, BLOCK_E: tl.constexpr, J: tl.constexpr):
    """Column index (per row) of the (J+1)-th largest value of v in the reference's order
    (``reference.routing.top_k``: NaN first, ties to the lower index); always a column < E."""
    oe = tl.arange(0, BLOCK_E)[None, :]
    avail = em[None, :] & (oe == oe)
    sel = _largest(v, avail, oe, BLOCK_E)
    for _ in tl.static_range(J):
        avail = avail & (oe != sel[:, None])
        sel = _largest(v, avail, oe, BLOCK_E)
    return sel


@triton.jit
def _pick(v, sel, BLOCK_E: tl.constexpr):
    """v[b, sel[b]] for every row b."""
    oe = tl.arange(0, BLOCK_E)[None, :]
    return tl.sum(tl.where(oe == sel[:, None], v, 0.0), axis=1)


@triton.jit
def _cv2_parts(v, em, E):
    """(mean + 1e-8, unbiased variance) of the first E entries of a (BLOCK_E,) vector."""
    mu = tl.sum(tl.where(em, v, 0.0), axis=0) / E
    d = tl.where(em, v - mu, 0.0)
    var = tl.sum(d * d, axis=0) / (E - 1)
    return mu + 1e-8, var


@triton.jit
def _loss_terms(logits, thr, cplx_ptr, B, E, noise_std, bm, em, USE_CPLX: tl.constexpr, BLOCK_E: tl.constexpr):
    """q = softmax(logits) (valid rows), importance (E,), z (B, E), load (E,)."""
    valid = bm[:, None] & em[None, :]
    q = tl.where(valid, _row_softmax(logits, em), 0.0)
    imp = tl.sum(q, axis=0)
    if USE_CPLX:
        imp = imp * tl.load(cplx_ptr + tl.arange(0, BLOCK_E), mask=em, other=0.0).to(tl.float32)
    z = (thr[:, None] - logits) / noise_std
    ld = tl.where(valid, 1.0 - 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)), 0.0)
    load = tl.sum(ld, axis=0) / B
    return q, imp, z, load


# ----------------------------------------------------------------------------- router forward
@triton.jit
def _route_head_kernel(part_ptr, fe_ptr, gw_ptr, fw_ptr, cplx_ptr, noise_ptr,
                       gates_ptr, idx_ptr, logits_ptr, loss_ptr,
                       B, C, F, E, SPLIT, inv_hw, noise_std,
                       K: tl.constexpr, COMPUTE_LOSS: tl.constexpr, USE_CPLX: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    ob = tl.arange(0, BLOCK_B)
    oe = tl.arange(0, BLOCK_E)
    bm = ob < B
    em = oe < E
    valid = bm[:, None] & em[None, :]
    logits = _logits_tile(part_ptr, fe_ptr, gw_ptr, fw_ptr, B, C, F, SPLIT, inv_hw, BLOCK_B, BLOCK_E, BLOCK_C, E)
    tl.store(logits_ptr + ob[:, None] * E + oe[None, :], logits, mask=valid)
    noisy = logits + tl.load(noise_ptr + ob[:, None] * E + oe[None, :], mask=valid, other=0.0).to(tl.float32)
    p = _row_softmax(noisy, em)
    for j in tl.static_range(K):
        sel = _kth_choice(p, em, BLOCK_E, j)
        tl.store(gates_ptr + ob * K + j, _pick(p, sel, BLOCK_E), mask=bm)
        tl.store(idx_ptr + ob * K + j, sel.to(tl.int64), mask=bm)
    if COMPUTE_LOSS:
        thr = _pick(noisy, _kth_choice(noisy, em, BLOCK_E, K - 1), BLOCK_E)
        q, imp, z, load = _loss_terms(logits, thr, cplx_ptr, B, E, noise_std, bm, em, USE_CPLX, BLOCK_E)
        m1, v1 = _cv2_parts(imp, em, E)
        m2, v2 = _cv2_parts(load, em, E)
        loss = 0.5 * (v1 / (m1 * m1)) + 0.5 * (v2 / (m2 * m2))
    else:
        loss = 0.0
    tl.store(loss_ptr, loss)


def _head_blocks(B: int, E: int, C: int, F: int) -> Tuple[int, int, int]:
    bb, be = _np2(B), _np2(E)
    bc = max(2, min(64, _np2(max(C, F)), 8192 // (bb * be)))
    return bb, be, bc


def _check_head(B: int, E: int) -> None:
    if B > 1024 or E > 256:
        raise ValueError(f"the triton router handles B <= 1024 images and E <= 256 experts, got B={B}, E={E}")


@register("moe_route", "triton", dtypes=FP32_AND_16BIT)
def route(x, freq_emb, gate_weight, freq_weight, complexity, noise, k, noise_std, compute_loss, use_complexity):
    """gates (B, k) fp32, indices (B, k) int64, logits (B, E) fp32, loss () fp32; see ops.routing.route."""
    B, C, H, W = x.shape
    E, F = gate_weight.shape[0], freq_emb.shape[1]
    _check_head(B, E)
    dev = x.device
    part, split = _pool_partials(x)
    gates = new_output((B, k), torch.float32, dev)
    indices = new_output((B, k), torch.int64, dev)
    logits = new_output((B, E), torch.float32, dev)
    loss = new_output((), torch.float32, dev)
    bb, be, bc = _head_blocks(B, E, C, F)
    _route_head_kernel[(1,)](part, freq_emb, gate_weight, freq_weight, complexity, noise, gates, indices, logits,
                             loss, B, C, F, E, split, 1.0 / (H * W), float(noise_std), K=int(k),
                             COMPUTE_LOSS=bool(compute_loss), USE_CPLX=bool(use_complexity), BLOCK_B=bb,
                             BLOCK_E=be, BLOCK_C=bc)
    return gates, indices, logits, loss


# ----------------------------------------------------------------------------- router backward
@triton.jit
def _dcv2(v, em, E):
    """d cv2(v) / d v for cv2 = var / (mean + 1e-8)^2 (unbiased var) over the first E entries."""
    m, var = _cv2_parts(v, em, E)
    mu = m - 1e-8
    return tl.where(em, 2.0 * (v - mu) / ((E - 1) * m * m) - 2.0 * var / (E * m * m * m), 0.0)


@triton.jit
def _route_head_bwd_kernel(part_ptr, fe_ptr, gw_ptr, fw_ptr, cplx_ptr, noise_ptr, gg_ptr, gl_ptr, gloss_ptr,
                           gfe_ptr, ggw_ptr, gfw_ptr, gpool_ptr,
                           B, C, F, E, SPLIT, inv_hw, noise_std,
                           K: tl.constexpr, COMPUTE_LOSS: tl.constexpr, USE_CPLX: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    ob = tl.arange(0, BLOCK_B)
    oe = tl.arange(0, BLOCK_E)
    oc = tl.arange(0, BLOCK_C)
    bm = ob < B
    em = oe < E
    valid = bm[:, None] & em[None, :]
    logits = _logits_tile(part_ptr, fe_ptr, gw_ptr, fw_ptr, B, C, F, SPLIT, inv_hw, BLOCK_B, BLOCK_E, BLOCK_C, E)
    noisy = logits + tl.load(noise_ptr + ob[:, None] * E + oe[None, :], mask=valid, other=0.0).to(tl.float32)
    p = _row_softmax(noisy, em)
    # gates = p[top-k]: scatter their grads, then softmax backward
    dp = tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.float32)
    for j in tl.static_range(K):
        sel = _kth_choice(p, em, BLOCK_E, j)
        g = tl.load(gg_ptr + ob * K + j, mask=bm, other=0.0).to(tl.float32)
        dp += tl.where(oe[None, :] == sel[:, None], g[:, None], 0.0)
    dlog = p * (dp - tl.sum(dp * p, axis=1)[:, None])
    dlog += tl.load(gl_ptr + ob[:, None] * E + oe[None, :], mask=valid, other=0.0).to(tl.float32)
    if COMPUTE_LOSS:
        kk = _kth_choice(noisy, em, BLOCK_E, K - 1)
        thr = _pick(noisy, kk, BLOCK_E)
        q, imp, z, load = _loss_terms(logits, thr, cplx_ptr, B, E, noise_std, bm, em, USE_CPLX, BLOCK_E)
        gloss = tl.load(gloss_ptr).to(tl.float32)
        dimp = 0.5 * gloss * _dcv2(imp, em, E)
        if USE_CPLX:
            dimp = dimp * tl.load(cplx_ptr + oe, mask=em, other=0.0).to(tl.float32)
        dq = tl.where(valid, dimp[None, :] + tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.float32), 0.0)
        dlog += q * (dq - tl.sum(dq * q, axis=1)[:, None])
        dload = 0.5 * gloss * _dcv2(load, em, E)
        phi = tl.exp(-0.5 * z * z) * 0.3989422804014327
        a = tl.where(valid, phi * (dload[None, :] / (noise_std * B)), 0.0)
        dthr = -tl.sum(a, axis=1)
        dlog += a + tl.where(oe[None, :] == kk[:, None], dthr[:, None], 0.0)
    dlog = tl.where(valid, dlog, 0.0)
    # grads of the linear maps: gw/fw (E, .), freq_emb (B, F), pooled (B, C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + oc
        cm = c < C
        m2 = bm[:, None] & cm[None, :]
        rows = (ob[:, None] * C + c[None, :]).to(tl.int64) * SPLIT
        pooled = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for s in range(0, SPLIT):
            pooled += tl.load(part_ptr + rows + s, mask=m2, other=0.0)
        pooled = pooled * inv_hw
        wm = em[:, None] & cm[None, :]
        tl.store(ggw_ptr + oe[:, None] * C + c[None, :], tl.sum(dlog[:, :, None] * pooled[:, None, :], axis=0),
                 mask=wm)
        w = tl.load(gw_ptr + oe[:, None] * C + c[None, :], mask=wm, other=0.0).to(tl.float32)
        tl.store(gpool_ptr + ob[:, None] * C + c[None, :], tl.sum(dlog[:, :, None] * w[None, :, :], axis=1) * inv_hw,
                 mask=m2)
    for f0 in range(0, F, BLOCK_C):
        f = f0 + oc
        fm = f < F
        m2 = bm[:, None] & fm[None, :]
        wm = em[:, None] & fm[None, :]
        v = tl.load(fe_ptr + ob[:, None] * F + f[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(gfw_ptr + oe[:, None] * F + f[None, :], tl.sum(dlog[:, :, None] * v[:, None, :], axis=0), mask=wm)
        w = tl.load(fw_ptr + oe[:, None] * F + f[None, :], mask=wm, other=0.0).to(tl.float32)
        tl.store(gfe_ptr + ob[:, None] * F + f[None, :], tl.sum(dlog[:, :, None] * w[None, :, :], axis=1), mask=m2)


@triton.jit
def _broadcast_rows_kernel(src_ptr, out_ptr, HW, BLOCK: tl.constexpr):
    """out[row, i] = src[row] for i < HW (cast to out's dtype); grid (rows, cdiv(HW, BLOCK))."""
    row = tl.program_id(0)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src_ptr + row)
    vals = tl.zeros([BLOCK], dtype=tl.float32) + v
    tl.store(out_ptr + row.to(tl.int64) * HW + idx, vals.to(out_ptr.dtype.element_ty), mask=idx < HW)


@register("moe_route_backward", "triton", dtypes=FP32_AND_16BIT)
def route_backward(grad_gates, grad_logits, grad_loss, x, freq_emb, gate_weight, freq_weight, complexity, noise,
                   k, noise_std, compute_loss, use_complexity):
    """(grad_x, grad_freq_emb, grad_gate_weight, grad_freq_weight) in the inputs' dtypes."""
    B, C, H, W = x.shape
    E, F = gate_weight.shape[0], freq_emb.shape[1]
    _check_head(B, E)
    dev = x.device
    part, split = _pool_partials(x)
    gpool = torch.empty((B, C), dtype=torch.float32, device=dev)  # scratch, fully written
    gfe = new_output(freq_emb.shape, freq_emb.dtype, dev)
    ggw = new_output(gate_weight.shape, gate_weight.dtype, dev)
    gfw = new_output(freq_weight.shape, freq_weight.dtype, dev)
    bb, be, bc = _head_blocks(B, E, C, F)
    _route_head_bwd_kernel[(1,)](part, freq_emb, gate_weight, freq_weight, complexity, noise, grad_gates, grad_logits,
                                 grad_loss, gfe, ggw, gfw, gpool, B, C, F, E, split, 1.0 / (H * W), float(noise_std),
                                 K=int(k), COMPUTE_LOSS=bool(compute_loss), USE_CPLX=bool(use_complexity),
                                 BLOCK_B=bb, BLOCK_E=be, BLOCK_C=bc)
    gx = new_output(x.shape, x.dtype, dev)
    blk = 1024
    _broadcast_rows_kernel[(B * C, cdiv(H * W, blk))](gpool, gx, H * W, BLOCK=blk)
    return gx, gfe, ggw, gfw


# ----------------------------------------------------------------------------- dispatch
@triton.jit
def _dispatch_kernel(idx_ptr, counts_ptr, offsets_ptr, perm_ptr, N, E, BLOCK: tl.constexpr):
    """Stable counting sort of the N slots by expert, in one program. Bucket E collects indices outside
    [0, E) (placed last, not counted) so that every entry of perm is written."""
    tl.store(offsets_ptr, 0)
    base = tl.sum(tl.zeros([BLOCK], dtype=tl.int64), axis=0)
    for e in range(0, E + 1):
        cnt = tl.sum(tl.zeros([BLOCK], dtype=tl.int64), axis=0)
        for s0 in range(0, N, BLOCK):
            si = s0 + tl.arange(0, BLOCK)
            inb = si < N
            v = tl.load(idx_ptr + si, mask=inb, other=0)
            key = tl.where((v >= 0) & (v < E), v, E)
            hit = (key == e) & inb
            h = hit.to(tl.int64)
            rank = tl.cumsum(h, axis=0) - 1
            tl.store(perm_ptr + base + cnt + rank, si.to(tl.int64), mask=hit)
            cnt += tl.sum(h, axis=0)
        if e < E:
            tl.store(counts_ptr + e, cnt)
            tl.store(offsets_ptr + e + 1, base + cnt)
        base += cnt


@register("moe_dispatch", "triton")
def dispatch(indices, num_experts):
    """counts (E,), offsets (E+1,), perm (B*k,) int64; perm = slot ids sorted by expert, stable."""
    n = indices.numel()
    dev = indices.device
    counts = new_output((num_experts,), torch.int64, dev)
    offsets = new_output((num_experts + 1,), torch.int64, dev)
    perm = new_output((n,), torch.int64, dev)
    block = min(1024, _np2(n))
    _dispatch_kernel[(1,)](indices, counts, offsets, perm, n, int(num_experts), BLOCK=block)
    return counts, offsets, perm


# ----------------------------------------------------------------------------- combine
@triton.jit
def _slot_positions(perm_ptr, b, NSLOT, K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """(BLOCK_K,) rows r with perm[r] == b*K + j (inverse permutation for image b), clamped in range."""
    oj = tl.arange(0, BLOCK_K)
    target = b * K + oj
    pos = tl.zeros([BLOCK_K], dtype=tl.int64)
    for p0 in range(0, NSLOT, BLOCK_P):
        pi = p0 + tl.arange(0, BLOCK_P)
        pv = tl.load(perm_ptr + pi, mask=pi < NSLOT, other=-1)
        pos += tl.sum(tl.where(pv[None, :] == target[:, None], pi[None, :].to(tl.int64), 0), axis=1)
    return tl.minimum(tl.maximum(pos, 0), NSLOT - 1)


@triton.jit
def _combine_kernel(eo_ptr, gates_ptr, perm_ptr, out_ptr, N, NSLOT,
                    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """out[b, i] = sum_j gates[b, j] * eo[pos(b*K + j), i] (fp32, j in order); grid (cdiv(N, BLOCK), B)."""
    blk = tl.program_id(0)
    b = tl.program_id(1)
    pos = _slot_positions(perm_ptr, b, NSLOT, K, BLOCK_K, BLOCK_P)
    oj = tl.arange(0, BLOCK_K)
    g = tl.load(gates_ptr + b * K + oj, mask=oj < K, other=0.0).to(tl.float32)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.sum(tl.where(oj == j, pos, 0), axis=0)
        gj = tl.sum(tl.where(oj == j, g, 0.0), axis=0)
        acc += gj * tl.load(eo_ptr + r * N + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + b.to(tl.int64) * N + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


_COMBINE_BLOCK = 1024


@register("moe_combine", "triton", dtypes=FP32_AND_16BIT)
def combine(expert_out, gates, perm):
    """(B, C, H, W) gated sum of each image's k expert rows, in expert_out's dtype."""
    B, k = gates.shape
    N = expert_out[0].numel() if expert_out.shape[0] else 0
    out = new_output((B,) + tuple(expert_out.shape[1:]), expert_out.dtype, expert_out.device)
    if N == 0 or B == 0:
        return out
    _combine_kernel[(cdiv(N, _COMBINE_BLOCK), B)](
        expert_out, gates, perm, out, N, B * k, K=int(k), BLOCK_K=_np2(k), BLOCK_P=min(256, _np2(B * k)),
        BLOCK=_COMBINE_BLOCK)
    return out


@triton.jit
def _combine_bwd_rows_kernel(grad_ptr, eo_ptr, gates_ptr, perm_ptr, geo_ptr, part_ptr, N, NSLOT, NBLK,
                             K: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of expert_out (slot s = perm[r], image s // K): geo[r] = gates[s] * grad[s // K];
    part[r, blk] = sum over the block of grad[s // K] * eo[r] (fp32). grid (NBLK, NSLOT)."""
    blk = tl.program_id(0)
    r = tl.program_id(1)
    s = tl.load(perm_ptr + r)
    s = tl.minimum(tl.maximum(s, 0), NSLOT - 1)
    b = s // K
    g = tl.load(gates_ptr + s).to(tl.float32)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    gr = tl.load(grad_ptr + b * N + offs, mask=m, other=0.0).to(tl.float32)
    e = tl.load(eo_ptr + r.to(tl.int64) * N + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(geo_ptr + r.to(tl.int64) * N + offs, (g * gr).to(geo_ptr.dtype.element_ty), mask=m)
    tl.store(part_ptr + r.to(tl.int64) * NBLK + blk, tl.sum(gr * e, axis=0))


@triton.jit
def _combine_bwd_gates_kernel(part_ptr, perm_ptr, ggates_ptr, NSLOT, NBLK, BLOCK: tl.constexpr):
    """grad_gates[perm[r]] = sum(part[r, :]) in a fixed order; grid (NSLOT,)."""
    r = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, NBLK, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + r.to(tl.int64) * NBLK + i, mask=i < NBLK, other=0.0)
    s = tl.load(perm_ptr + r)
    s = tl.minimum(tl.maximum(s, 0), NSLOT - 1)
    tl.store(ggates_ptr + s, tl.sum(acc, axis=0).to(ggates_ptr.dtype.element_ty))


@register("moe_combine_backward", "triton", dtypes=FP32_AND_16BIT)
def combine_backward(grad, expert_out, gates, perm):
    """(grad_expert_out (B*k, C, H, W), grad_gates (B, k)) in the inputs' dtypes."""
    B, k = gates.shape
    nslot = B * k
    N = expert_out[0].numel() if nslot else 0
    geo = new_output(expert_out.shape, expert_out.dtype, expert_out.device)
    ggates = new_output(gates.shape, gates.dtype, gates.device)
    if nslot == 0:
        return geo, ggates
    nblk = cdiv(N, _COMBINE_BLOCK)
    part = torch.empty((nslot, max(nblk, 1)), dtype=torch.float32, device=expert_out.device)
    if nblk == 0:
        part.zero_()
    else:
        _combine_bwd_rows_kernel[(nblk, nslot)](grad, expert_out, gates, perm, geo, part, N, nslot, nblk, K=int(k),
                                                BLOCK=_COMBINE_BLOCK)
    _combine_bwd_gates_kernel[(nslot,)](part, perm, ggates, nslot, max(nblk, 1), BLOCK=min(1024, _np2(nblk)))
    return geo, ggates
