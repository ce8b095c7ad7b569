"""Grouped expert convolutions: the backend-agnostic driver of the fast, sync-free MoCE expert stage.

The Triton and CUDA backends of ``moe_experts`` / ``moe_experts_backward`` share this driver and
differ only in the kernels they pass in (:class:`Kernels`). Nothing here reads device data on the
host: every buffer is sized by ``N = B * k`` and the per-expert ranks, every grid by ``N``; the
kernels find each row's expert from ``offsets`` on the device.

One expert step (rank r, window p), for the N rows (row n of expert e's segment is image
``perm[n] // k``):

  qkv_pre = W_eff @ src,  W_eff = [W_q; W_kv] @ W_proj0       (1x1 fold: z = pw_0(x) never exists)
  q = dw_3(qkv_pre[:r]) + b_q;  k, v = split(dw_7(qkv_pre[r:]) + b_kv)   (fused pw->dw, one launch
                                                                          per conv for all experts)
  attn = LN(circconv_p(q, k)) * v                              (window attention, one launch per expert)
  out  = src + pw_2((pw_o(attn) + b_o) * silu(pw_1(shared)))   (one fused launch for all experts)

Buffers (per expert e, rank r_e, ``rb_e = N*HW*sum_{e'<e} r_e'``, ``R = N*HW*sum r``):
  packed weights (x dtype): [W_eff (3r x C), q_dw (r x 9), kv_dw (2r x 49), b_q, b_kv, W_o, b_o, W_1, W_2]
  act (x dtype): q at rb_e, k at R + rb_e, v at 2R + rb_e, attn at 3R + rb_e (each (N, r, H, W))
  gy (backward): (N, 3r, H, W) at 3 rb_e.
The backward recomputes each step's forward (activation checkpointing) and chains depth > 1 steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..testing import new_output

WEIGHTS_PER_EXPERT = 13
_PACK = ("weff", "qdw", "kvdw", "qdb", "kvdb", "ow", "ob", "p1", "p2")
EPS = 1e-5


@dataclass(frozen=True)
class Kernels:
    """Launchers a backend supplies (signatures as in moce_kernels/triton/expert_conv.py / experts.py)."""
    pwdw: Callable
    pwdw_bwd: Callable
    gemm: Callable
    wgrad: Callable
    final_fwd: Optional[Callable] = None
    final_bwd: Optional[Callable] = None
    gather_sum: Optional[Callable] = None
    attention: Optional[Callable] = None  # () -> (window_attention_rows, window_attention_rows_backward)


@dataclass
class Layout:
    """Host-known sizes and offsets of the packed weights and activation buffers."""
    C: int
    N: int
    HW: int
    ranks: List[int]
    kq: int
    kkv: int
    w: List[Dict[str, int]]  # per expert: packed-weight offset of each entry of _PACK
    w_total: int
    rb: List[int]  # per expert: base of its (N, r, H, W) block in a rank-sized buffer
    R: int

    @property
    def max_r(self) -> int:
        return max(self.ranks) if self.ranks else 0


def _sizes(C: int, r: int, kq: int, kkv: int) -> Dict[str, int]:
    return {"weff": 3 * r * C, "qdw": r * kq * kq, "kvdw": 2 * r * kkv * kkv, "qdb": r, "kvdb": 2 * r, "ow": r * r,
            "ob": r, "p1": r * C, "p2": C * r}


def make_layout(x: torch.Tensor, N: int, weights: Sequence[torch.Tensor]) -> Layout:
    """Check the expert weights' shapes and lay out the packed buffers."""
    C, HW = x.shape[1], x.shape[2] * x.shape[3]
    E = len(weights) // WEIGHTS_PER_EXPERT
    ranks, kqs, kkvs = [], set(), set()
    for e in range(E):
        w = weights[e * WEIGHTS_PER_EXPERT:(e + 1) * WEIGHTS_PER_EXPERT]
        r = w[0].shape[0]
        expect = [(r, C, 1, 1), (r, C, 1, 1), (C, r, 1, 1), (r, r, 1, 1), None, (r,), (2 * r, r, 1, 1), None,
                  (2 * r,), (r,), (r,), (r, r, 1, 1), (r,)]
        for i, (t, shp) in enumerate(zip(w, expect)):
            if shp is not None and tuple(t.shape) != shp:
                raise ValueError(f"expert {e} weight {i} has shape {tuple(t.shape)}, expected {shp} (rank {r})")
        if w[4].dim() != 4 or tuple(w[4].shape[:2]) != (r, 1) or w[7].dim() != 4 or tuple(w[7].shape[:2]) != (2 * r, 1):
            raise ValueError(f"expert {e}: depthwise weights must be (r, 1, k, k) and (2r, 1, k, k)")
        ranks.append(r)
        kqs.add(w[4].shape[-1])
        kkvs.add(w[7].shape[-1])
    if len(kqs) > 1 or len(kkvs) > 1:
        raise ValueError("all experts must share the depthwise kernel sizes")
    kq, kkv = (kqs.pop() if kqs else 3), (kkvs.pop() if kkvs else 7)
    offs, pos = [], 0
    for r in ranks:
        d = {}
        for name, size in _sizes(C, r, kq, kkv).items():
            d[name] = pos
            pos += size
        offs.append(d)
    rb, acc = [], 0
    for r in ranks:
        rb.append(acc)
        acc += N * r * HW
    return Layout(C, N, HW, ranks, kq, kkv, offs, pos, rb, acc)


def _cdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gdt(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16) else _cdt(dtype)


def _split(weights: Sequence[torch.Tensor], e: int) -> Sequence[torch.Tensor]:
    return weights[e * WEIGHTS_PER_EXPERT:(e + 1) * WEIGHTS_PER_EXPERT]


def pack_weights(lay: Layout, weights: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One flat buffer of every expert's weights (W_eff folded in the compute dtype)."""
    parts = []
    for e, r in enumerate(lay.ranks):
        p0, p1, p2, qw, qdw, qdb, kvw, kvdw, kvdb, _, _, ow, ob = _split(weights, e)
        cdt = _cdt(dtype)
        wcat = torch.cat([qw.reshape(r, r), kvw.reshape(2 * r, r)]).to(cdt)
        weff = (wcat @ p0.reshape(r, lay.C).to(cdt)).to(dtype)
        parts += [weff, qdw, kvdw, qdb, kvdb, ow, ob, p1, p2]
    if not parts:
        return torch.zeros(1, dtype=dtype)
    return torch.cat([t.reshape(-1).to(dtype) for t in parts])


def _active(lay: Layout, depths: Sequence[int], step: int) -> List[int]:
    return [r if d > step else 0 for r, d in zip(lay.ranks, depths)]


def _pwdw_meta(lay: Layout, act_r: List[int], kv: bool) -> List[List[int]]:
    """Rows for the grouped pw->dw launches (columns: see expert_conv.PD_*)."""
    rows = []
    for e, (r, ra) in enumerate(zip(lay.ranks, act_r)):
        w = lay.w[e]
        base = lay.R + lay.rb[e] if kv else lay.rb[e]
        rows.append([lay.C, 2 * ra if kv else ra, w["weff"] + (r * lay.C if kv else 0), w["kvdw" if kv else "qdw"],
                     0, w["kvdb" if kv else "qdb"], 0, lay.C * lay.HW, base, max(r, 1), lay.R, r * lay.HW,
                     3 * lay.rb[e] + (r * lay.HW if kv else 0), 3 * r * lay.HW])
    return rows


def _final_meta(lay: Layout, act_r: List[int]) -> List[List[int]]:
    return [[ra, lay.w[e]["ow"], lay.w[e]["ob"], lay.w[e]["p1"], lay.w[e]["p2"], lay.rb[e]]
            for e, ra in enumerate(act_r)]


def _views(buf: torch.Tensor, lay: Layout, e: int, region: int, H: int, W: int) -> torch.Tensor:
    r = lay.ranks[e]
    start = region * lay.R + lay.rb[e]
    return buf[start:start + lay.N * r * lay.HW].view(lay.N, r, H, W)


META_COLS = 16
_META_CACHE: Dict[Tuple, torch.Tensor] = {}


def meta_tensor(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """(E, META_COLS) int64 device table from host ints; cached per content, so steady-state
    calls do no host->device copy (and CUDA graphs can capture the launches)."""
    key = (str(device),) + tuple(tuple(int(v) for v in r) for r in rows)
    t = _META_CACHE.get(key)
    if t is None:
        full = [list(r) + [0] * (META_COLS - len(r)) for r in rows]
        t = torch.tensor(full, dtype=torch.int64, device=device)
        if len(_META_CACHE) > 4096:
            _META_CACHE.clear()
        _META_CACHE[key] = t
    return t


class _Stage:
    """The launches of the expert stage for all experts at once."""

    def __init__(self, K: Kernels, x: torch.Tensor, shared: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor,
                 k: int, weights: Sequence[torch.Tensor], windows: Sequence[int], depths: Sequence[int]):
        self.K, self.x, self.shared, self.perm, self.offsets, self.k = K, x, shared, perm, offsets, int(k)
        self.weights, self.windows, self.depths = weights, list(windows), list(depths)
        self.N = perm.numel()
        self.lay = make_layout(x, self.N, weights)
        self.H, self.W = x.shape[2], x.shape[3]
        self.dev = x.device
        self.wp = pack_weights(self.lay, weights, x.dtype)
        self.steps = max(self.depths) if self.depths else 0
        self.wa, self.wa_bwd = K.attention()

    def _meta(self, rows: List[List[int]]) -> torch.Tensor:
        return meta_tensor(rows, self.dev)

    def attn_view(self, act: torch.Tensor) -> torch.Tensor:
        return act[3 * self.lay.R:]

    def qkv_attn(self, src: torch.Tensor, step: int, act: torch.Tensor) -> None:
        """q, k, v (fused pw->dw, all experts per launch), then the window attention per expert."""
        lay, ra = self.lay, _active(self.lay, self.depths, step)
        perm = self.perm if step == 0 else None
        mr = max(ra) if ra else 0
        if mr == 0:
            return
        self.K.pwdw(src, self.wp, self.wp, None, self.wp, act, self.offsets, self._meta(_pwdw_meta(lay, ra, False)),
                    self.N, self.H, self.W, lay.kq, mr, mode=0, perm=perm, kslots=self.k)
        self.K.pwdw(src, self.wp, self.wp, None, self.wp, act, self.offsets, self._meta(_pwdw_meta(lay, ra, True)),
                    self.N, self.H, self.W, lay.kkv, 2 * mr, mode=0, perm=perm, kslots=self.k)
        for e, r in enumerate(ra):
            if r == 0:
                continue
            nw, nb = _split(self.weights, e)[9:11]
            v = [_views(act, lay, e, reg, self.H, self.W) for reg in range(4)]
            self.wa(v[0], v[1], v[2], self.windows[e], nw, nb, EPS, v[3], self.offsets[e:e + 2])

    def step_forward(self, src: torch.Tensor, step: int, out: torch.Tensor, act: torch.Tensor) -> None:
        self.qkv_attn(src, step, act)
        ra = _active(self.lay, self.depths, step)
        self.K.final_fwd(src, self.shared, self.attn_view(act), self.wp, out, self.offsets,
                         self._meta(_final_meta(self.lay, ra)), self.perm, self.k, self.N, self.lay.C, self.lay.HW,
                         step == 0, max(ra) if ra else 0)

    def forward(self, keep_inputs: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Output rows (N, C, H, W) and, with keep_inputs, the input rows of steps 1..d-1."""
        x, N = self.x, self.N
        act = torch.empty(max(4 * self.lay.R, 1), dtype=x.dtype, device=self.dev)
        src, inputs = x, []
        n_steps = max(self.steps, 1)
        for s in range(n_steps):
            last = s == n_steps - 1
            shape = (N,) + tuple(x.shape[1:])
            out = new_output(shape, x.dtype, self.dev) if last else torch.empty(shape, dtype=x.dtype, device=self.dev)
            self.step_forward(src, s, out, act)
            if keep_inputs and not last:
                inputs.append(out)
            src = out
            if keep_inputs and len(inputs) == self.steps - 1:
                break
        return src, inputs

    def backward(self, grad: torch.Tensor) -> List[torch.Tensor]:
        lay, N, x, dev = self.lay, self.N, self.x, self.dev
        cdt, gdt = _cdt(x.dtype), _gdt(x.dtype)
        _, inputs = self.forward(keep_inputs=True) if self.steps > 1 else (None, [])
        step_inputs = [x] + inputs
        gpack = torch.zeros(max(lay.w_total, 1), dtype=cdt, device=dev)
        gnorm = [torch.zeros(2, r, dtype=cdt, device=dev) for r in lay.ranks]
        gsh = torch.zeros((N,) + tuple(x.shape[1:]), dtype=cdt, device=dev)
        act = torch.empty(max(4 * lay.R, 1), dtype=x.dtype, device=dev)
        gact = torch.empty(max(4 * lay.R, 1), dtype=gdt, device=dev)
        G = grad
        for s in reversed(range(self.steps)):
            G = self._step_backward(G, step_inputs[s], s, act, gact, gpack, gsh, gnorm)
        inv = torch.empty_like(self.perm)
        inv.scatter_(0, self.perm, torch.arange(N, dtype=self.perm.dtype, device=dev))
        gx = new_output(x.shape, x.dtype, dev)
        self.K.gather_sum(G.contiguous(), inv, gx, self.k)
        gs = new_output(x.shape, x.dtype, dev)
        self.K.gather_sum(gsh, inv, gs, self.k)
        return [gx, gs] + self._weight_grads(gpack, gnorm)

    def _step_backward(self, G, src, s, act, gact, gpack, gsh, gnorm) -> torch.Tensor:
        lay, N, C, HW, K, off = self.lay, self.N, self.lay.C, self.lay.HW, self.K, self.offsets
        ra = _active(lay, self.depths, s)
        mr = max(ra) if ra else 0
        cdt, gdt = _cdt(self.x.dtype), _gdt(self.x.dtype)
        gx = G.to(cdt).contiguous() if G.dtype != cdt else G.clone()
        if mr == 0:
            return gx
        perm0 = self.perm if s == 0 else None
        self.qkv_attn(src, s, act)
        attn, gattn = self.attn_view(act), self.attn_view(gact)
        gt, gu, h = (torch.empty(max(lay.R, 1), dtype=gdt, device=self.dev) for _ in range(3))
        K.final_bwd(G, self.shared, attn, self.wp, gt, gu, h, off, self._meta(_final_meta(lay, ra)), self.perm, self.k,
                    N, C, HW, mr)
        rk = [[ra[e], lay.rb[e], lay.ranks[e] * HW] for e in range(len(ra))]
        w = lay.w
        K.gemm(gt, self.wp, None, gattn, off, self._meta([[a, a, w[e]["ow"], 1, a, 0, b, rs, b, rs]
                                                          for e, (a, b, rs) in enumerate(rk)]), N, HW, mr)
        K.wgrad(gt, attn, gpack, gpack, off, self._meta([[a, a, w[e]["ow"], b, rs, b, rs, w[e]["ob"]]
                                                         for e, (a, b, rs) in enumerate(rk)]), HW, mr, mr, N)
        K.gemm(gu, self.wp, None, gsh, off, self._meta([[a, C, w[e]["p1"], 1, C, 0, b, rs, 0, C * HW]
                                                        for e, (a, b, rs) in enumerate(rk)]), N, HW, C,
               accumulate=True)
        K.wgrad(gu, self.shared, gpack, None, off, self._meta([[a, C, w[e]["p1"], b, rs, 0, C * HW, 0]
                                                               for e, (a, b, rs) in enumerate(rk)]), HW, mr, C, N,
                perm=self.perm, kslots=self.k)
        K.wgrad(G, h, gpack, None, off, self._meta([[C if a else 0, a, w[e]["p2"], 0, C * HW, b, rs, 0]
                                                    for e, (a, b, rs) in enumerate(rk)]), HW, C, mr, N)
        for e, r in enumerate(ra):
            if r == 0:
                continue
            nw, nb = _split(self.weights, e)[9:11]
            v = [_views(act, lay, e, reg, self.H, self.W) for reg in range(3)]
            gv = [_views(gact, lay, e, reg, self.H, self.W) for reg in range(4)]
            gw, gb = self.wa_bwd(gv[3], v[0], v[1], v[2], self.windows[e], nw, nb, EPS, gv[0], gv[1], gv[2],
                                 off[e:e + 2])
            gnorm[e][0] += gw.to(gnorm[e].dtype)
            gnorm[e][1] += gb.to(gnorm[e].dtype)
        gy = torch.empty(max(3 * lay.R, 1), dtype=gdt, device=self.dev)
        for kv in (False, True):
            K.pwdw_bwd(src, self.wp, self.wp, None, gact, gy, gpack, gpack, off, self._meta(_pwdw_meta(lay, ra, kv)),
                       N, self.H, self.W, lay.kkv if kv else lay.kq, 2 * mr if kv else mr, perm=perm0, kslots=self.k)
        gmeta = [[3 * a, C, w[e]["weff"], 3 * b, 3 * rs, 0, C * HW, 0] for e, (a, b, rs) in enumerate(rk)]
        K.wgrad(gy, src, gpack, None, off, self._meta(gmeta), HW, 3 * mr, C, N, perm=perm0, kslots=self.k)
        K.gemm(gy, self.wp, None, gx, off, self._meta([[3 * a, C, w[e]["weff"], 1, C, 0, 3 * b, 3 * rs, 0, C * HW]
                                                       for e, (a, b, rs) in enumerate(rk)]), N, HW, C,
               accumulate=True)
        return gx

    def _weight_grads(self, gpack: torch.Tensor, gnorm: List[torch.Tensor]) -> List[torch.Tensor]:
        """Unpack the accumulated gradients; undo the W_eff fold: dW_cat = dW_eff P0^T, dP0 = W_cat^T dW_eff."""
        lay, C, out = self.lay, self.lay.C, []
        for e, r in enumerate(lay.ranks):
            w = _split(self.weights, e)
            o = lay.w[e]
            sz = _sizes(C, r, lay.kq, lay.kkv)
            g = {n: gpack[o[n]:o[n] + sz[n]] for n in _PACK}
            cdt = gpack.dtype
            wcat = torch.cat([w[3].reshape(r, r), w[6].reshape(2 * r, r)]).to(cdt)
            dweff = g["weff"].view(3 * r, C)
            dwcat = dweff @ w[0].reshape(r, C).to(cdt).t()
            dp0 = wcat.t() @ dweff
            vals = [dp0, g["p1"], g["p2"], dwcat[:r], g["qdw"], g["qdb"], dwcat[r:], g["kvdw"], g["kvdb"],
                    gnorm[e][0], gnorm[e][1], g["ow"], g["ob"]]
            for v, like in zip(vals, w):
                t = new_output(like.shape, like.dtype, like.device)
                t.copy_(v.reshape(like.shape))
                out.append(t)
        return out


def experts_forward(K: Kernels, x, shared, perm, offsets, k, weights, windows, depths) -> torch.Tensor:
    """(B*k, C, H, W) rows of the expert stage (see module docstring); no host synchronisation."""
    return _Stage(K, x, shared, perm, offsets, k, weights, windows, depths).forward()[0]


def experts_backward(K: Kernels, grad, x, shared, perm, offsets, k, weights, windows, depths) -> List[torch.Tensor]:
    """[grad_x, grad_shared, grad of each weight] (zeros for experts that got no image)."""
    return _Stage(K, x, shared, perm, offsets, k, weights, windows, depths).backward(grad.contiguous())


# ----------------------------------------------------------------------------- the plain / gated ops (E = 1)
def _single_expert(B: int, device: torch.device) -> torch.Tensor:
    return meta_tensor([[0, B]], device)[0, :2].contiguous()


def _conv_meta(c_in: int, c_out: int, HW: int, out_ch: int) -> List[int]:
    """One _pwdw meta row: src (B, c_in, HW) rows, out (B, out_ch, HW), gy (B, c_out, HW)."""
    return [c_in, c_out, 0, 0, 0, 0, 0, c_in * HW, 0, out_ch, 0, out_ch * HW, 0, c_out * HW]


def _to(acc: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Accumulator -> a fresh output in ``like``'s dtype (poisonable allocation)."""
    out = new_output(like.shape, like.dtype, like.device)
    out.copy_(acc.view(like.shape))
    return out


def pwdw_forward(K: Kernels, x, pw_weight, dw_weight, pw_bias, dw_bias, gated: bool) -> torch.Tensor:
    """pointwise_depthwise_conv(_gated) forward: one fused launch."""
    B, c_in, H, W = x.shape
    c_out, ks = pw_weight.shape[0], dw_weight.shape[-1]
    n_out = c_out // 2 if gated else c_out
    out = new_output((B, n_out, H, W), x.dtype, x.device)
    meta = meta_tensor([_conv_meta(c_in, c_out, H * W, n_out)], x.device)
    K.pwdw(x, pw_weight, dw_weight, pw_bias, dw_bias, out, _single_expert(B, x.device), meta, B, H, W, ks, n_out,
           mode=1 if gated else 0)
    return out


def pwdw_backward(K: Kernels, grad, x, pw_weight, dw_weight, pw_bias, dw_bias, gated: bool) -> List[torch.Tensor]:
    """Backward: (gated: recompute a, b and write dL/d(a, b)); recompute the 1x1 halo, dL/dy and the
    depthwise weight/bias grads in one launch; then the 1x1's weight/bias grad and dL/dx."""
    B, c_in, H, W = x.shape
    c_out, ks = pw_weight.shape[0], dw_weight.shape[-1]
    HW, dev, cdt, gdt = H * W, x.device, _cdt(x.dtype), _gdt(x.dtype)
    offsets = _single_expert(B, dev)
    if gated:
        go = torch.empty((B, c_out, H, W), dtype=gdt, device=dev)
        K.pwdw(x, pw_weight, dw_weight, pw_bias, dw_bias, go, offsets,
               meta_tensor([_conv_meta(c_in, c_out, HW, c_out // 2)], dev), B, H, W, ks, c_out // 2, mode=2,
               g=grad, gofull=go)
    else:
        go = grad
    gy = torch.empty((B, c_out, H, W), dtype=gdt, device=dev)
    gdw = torch.zeros(dw_weight.shape, dtype=cdt, device=dev)
    gdb = torch.zeros((c_out,), dtype=cdt, device=dev) if dw_bias is not None else None
    K.pwdw_bwd(x, pw_weight, dw_weight, pw_bias, go, gy, gdw, gdb, offsets,
               meta_tensor([_conv_meta(c_in, c_out, HW, c_out)], dev), B, H, W, ks, c_out)
    gpw = torch.zeros((c_out, c_in), dtype=cdt, device=dev)
    gpb = torch.zeros((c_out,), dtype=cdt, device=dev) if pw_bias is not None else None
    K.wgrad(gy, x, gpw, gpb, offsets, meta_tensor([[c_out, c_in, 0, 0, c_out * HW, 0, c_in * HW, 0]], dev), HW,
            c_out, c_in, B)
    gx = new_output(x.shape, x.dtype, dev)
    K.gemm(gy, pw_weight, None, gx, offsets,
           meta_tensor([[c_out, c_in, 0, 1, c_in, 0, 0, c_out * HW, 0, c_in * HW]], dev), B, HW, c_in)
    res = [gx, _to(gpw, pw_weight), _to(gdw, dw_weight)]
    if pw_bias is not None:
        res.append(_to(gpb, pw_bias))
    if dw_bias is not None:
        res.append(_to(gdb, dw_bias))
    return res
