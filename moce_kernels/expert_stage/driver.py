"""The driver of the sync-free MoCE expert stage and of the plain pointwise->depthwise ops.

Backend-agnostic: a backend passes its launchers (:class:`.interface.ExpertStageKernels`) and the
driver decides the buffers, the meta tables (:mod:`.layouts`) and the launch order. Nothing here
reads device data on the host: every buffer is sized by ``N = B * k`` and the per-expert ranks,
every grid by ``N``; the kernels find each row's expert from ``offsets`` on the device.

One expert step (rank r, window p; :class:`.weights.ExpertWeights` names), for the N rows (row n of
expert e's segment is image ``perm[n] // k``):

  qkv_pre = W_eff @ src,  W_eff = [q; kv] @ proj0             (1x1 fold: z = proj0(x) never exists)
  q = dw_3(qkv_pre[:r]) + q_dw_bias;  k, v = split(dw_7(qkv_pre[r:]) + kv_dw_bias)
                                                  (fused pw->dw, one launch per conv for all experts)
  attn = LN(circconv_p(q, k)) * v                 (window attention, one launch per expert)
  out  = src + proj2((proj_out(attn) + proj_out_bias) * silu(proj1(shared)))
                                                  (the epilogue: one launch for all experts)

Buffers (per expert e, rank r_e, ``rb_e = N*HW*sum_{e'<e} r_e'``, ``R = N*HW*sum r``):
  packed weights (x dtype): per expert the entries of ``PACKED`` (W_eff (3r x C), q_dw (r x kq^2), ...)
  act (x dtype): q at rb_e, k at R + rb_e, v at 2R + rb_e, attn at 3R + rb_e (each (N, r, H, W))
  gy (backward): (N, 3r, H, W) at 3 rb_e.
The backward recomputes each step's forward (activation checkpointing) and chains depth > 1 steps.
The plain ops (``pointwise_depthwise_conv(_gated)``) run the same grouped kernels as a group of one.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Sequence, Tuple

import torch

from ..outputs import new_output
from .interface import ExpertStageKernels
from .layouts import EpilogueCol, GemmCol, PwDwCol, PwDwMode, WgradCol, meta_row
from .plan import (EPS, PACKED, Layout, _sizes, _w_cat, accumulation_dtype, grad_dtype,  # noqa: F401
                   make_layout, plan_for)
from .tables import Rows, cached_table, device_table  # noqa: F401  (device_table: the trunk's Triton ops)
from .weights import ExpertWeights

def _active(lay: Layout, depths: Sequence[int], step: int) -> List[int]:
    return [r if d > step else 0 for r, d in zip(lay.ranks, depths)]


def _pwdw_rows(lay: Layout, act_r: List[int], kv: bool) -> List[Tuple[int, ...]]:
    """``PwDwCol`` rows of the q (or, with ``kv``, the k and v) pw->dw launch of the expert stage."""
    rows = []
    for e, (r, ra) in enumerate(zip(lay.ranks, act_r)):
        w, rs = lay.w[e], r * lay.HW
        rows.append(meta_row(
            PwDwCol, C_IN=lay.C, C_OUT=2 * ra if kv else ra, PW_WEIGHT=w["w_eff"] + (r * lay.C if kv else 0),
            DW_WEIGHT=w["kv_dw" if kv else "q_dw"], PW_BIAS=0, DW_BIAS=w["kv_dw_bias" if kv else "q_dw_bias"],
            SRC=0, SRC_ROW_STRIDE=lay.C * lay.HW, OUT=(lay.R if kv else 0) + lay.rb[e], OUT_SPLIT=max(r, 1),
            OUT_SPLIT_STRIDE=lay.R, OUT_ROW_STRIDE=rs, GRAD_PW=3 * lay.rb[e] + (rs if kv else 0),
            GRAD_PW_ROW_STRIDE=3 * rs))
    return rows


def _epilogue_rows(lay: Layout, act_r: List[int]) -> List[Tuple[int, ...]]:
    return [meta_row(EpilogueCol, RANK=ra, PROJ_OUT=w["proj_out"], PROJ_OUT_BIAS=w["proj_out_bias"],
                     PROJ1=w["proj1"], PROJ2=w["proj2"], ATTN=rb)
            for ra, w, rb in zip(act_r, lay.w, lay.rb)]


def gemm_t_row(c_in: int, c_out: int, weight: int, src: int, src_rs: int, out: int, out_rs: int) -> Tuple[int, ...]:
    """``GemmCol`` row of ``out = W^T src`` for a 1x1 weight W stored (c_in, c_out) at ``weight``: the
    input gradient of that 1x1."""
    return meta_row(GemmCol, C_IN=c_in, C_OUT=c_out, WEIGHT=weight, WEIGHT_OUT_STRIDE=1, WEIGHT_IN_STRIDE=c_out,
                    BIAS=0, SRC=src, SRC_ROW_STRIDE=src_rs, OUT=out, OUT_ROW_STRIDE=out_rs)


def _wgrad_row(c_out: int, c_in: int, grad_weight: int, g: int, g_rs: int, x: int, x_rs: int,
               grad_bias: int = 0) -> Tuple[int, ...]:
    return meta_row(WgradCol, C_OUT=c_out, C_IN=c_in, GRAD_WEIGHT=grad_weight, G=g, G_ROW_STRIDE=g_rs, X=x,
                    X_ROW_STRIDE=x_rs, GRAD_BIAS=grad_bias)


def _backward_rows(lay: Layout, act_r: List[int], name: str) -> List[Tuple[int, ...]]:
    """Rows of one of the backward's gemm (``d_*``: an input gradient) or wgrad (``w_*``) launches,
    per expert: a = active rank, b = base and rs = row stride of its block in a rank-sized buffer."""
    C, HW = lay.C, lay.HW
    blocks = [(a, lay.rb[e], lay.ranks[e] * HW, lay.w[e]) for e, a in enumerate(act_r)]
    row = {
        "d_attn": lambda a, b, rs, w: gemm_t_row(a, a, w["proj_out"], b, rs, b, rs),
        "w_proj_out": lambda a, b, rs, w: _wgrad_row(a, a, w["proj_out"], b, rs, b, rs, w["proj_out_bias"]),
        "d_shared": lambda a, b, rs, w: gemm_t_row(a, C, w["proj1"], b, rs, 0, C * HW),
        "w_proj1": lambda a, b, rs, w: _wgrad_row(a, C, w["proj1"], b, rs, 0, C * HW),
        "w_proj2": lambda a, b, rs, w: _wgrad_row(C if a else 0, a, w["proj2"], 0, C * HW, b, rs),
        "w_eff": lambda a, b, rs, w: _wgrad_row(3 * a, C, w["w_eff"], 3 * b, 3 * rs, 0, C * HW),
        "d_src": lambda a, b, rs, w: gemm_t_row(3 * a, C, w["w_eff"], 3 * b, 3 * rs, 0, C * HW),
    }[name]
    return [row(*blk) for blk in blocks]


class _Stage:
    """The launches of the expert stage for all experts at once."""

    def __init__(self, kernels: ExpertStageKernels, x: torch.Tensor, shared: torch.Tensor, perm: torch.Tensor,
                 offsets: torch.Tensor, k: int, experts: Sequence[ExpertWeights], windows: Sequence[int],
                 depths: Sequence[int]):
        self.K, self.x, self.shared, self.perm, self.offsets, self.k = kernels, x, shared, perm, offsets, int(k)
        self.experts, self.windows, self.depths = experts, windows, depths
        self.N = perm.shape[0]
        self.H, self.W = x.shape[2], x.shape[3]
        self.dev = x.device
        self.plan = plan_for(experts, windows, depths, x.shape[1], x.dtype, self.dev)
        self.lay = self.plan.layout(self.N, self.H * self.W)
        self.wp = self.plan.wp
        self.steps = max(depths) if depths else 0

    def _meta(self, key: Tuple, rows: Callable[[], Rows]) -> torch.Tensor:
        """The plan's meta table ``key`` at this call's shape class, built once from ``rows()``."""
        return self.plan.table((self.N, self.H, self.W) + key, rows)

    def _views(self, buf: torch.Tensor, e: int, regions: int) -> List[torch.Tensor]:
        """Expert e's (N, r, H, W) blocks in the first ``regions`` rank-sized regions of ``buf``."""
        lay, r = self.lay, self.lay.ranks[e]
        starts = [reg * lay.R + lay.rb[e] for reg in range(regions)]
        return [buf[s:s + lay.N * r * lay.HW].view(lay.N, r, self.H, self.W) for s in starts]

    def attn_view(self, act: torch.Tensor) -> torch.Tensor:
        return act[3 * self.lay.R:]

    def qkv_attn(self, src: torch.Tensor, step: int, act: torch.Tensor) -> None:
        """q, k, v (fused pw->dw, all experts per launch), then the window attention per expert."""
        lay, ra = self.lay, _active(self.lay, self.depths, step)
        perm = self.perm if step == 0 else None
        mr = max(ra) if ra else 0
        if mr == 0:
            return
        for kv in (False, True):
            self.K.pwdw(src, self.wp, self.wp, None, self.wp, act, self.offsets, self._meta(("pwdw", step, kv), lambda: _pwdw_rows(lay, ra, kv)),
                        self.N, self.H, self.W, lay.kkv if kv else lay.kq, 2 * mr if kv else mr,
                        mode=PwDwMode.PLAIN, perm=perm, kslots=self.k)
        for e, r in enumerate(ra):
            if r == 0:
                continue
            w = self.experts[e]
            q, k, v, attn = self._views(act, e, 4)
            self.K.attention_rows(q, k, v, self.windows[e], w.norm_weight, w.norm_bias, EPS, attn,
                                  self.offsets[e:e + 2])

    def step_forward(self, src: torch.Tensor, step: int, out: torch.Tensor, act: torch.Tensor) -> None:
        self.qkv_attn(src, step, act)
        ra = _active(self.lay, self.depths, step)
        self.K.epilogue(src, self.shared, self.attn_view(act), self.wp, out, self.offsets,
                        self._meta(("epilogue", step), lambda: _epilogue_rows(self.lay, ra)), self.perm, self.k,
                        self.N, self.lay.C, self.lay.HW,
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

    def backward(self, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[ExpertWeights]]:
        lay, N, x, dev = self.lay, self.N, self.x, self.dev
        cdt, gdt = accumulation_dtype(x.dtype), grad_dtype(x.dtype)
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
        return gx, gs, self._weight_grads(gpack, gnorm)

    def _step_backward(self, G, src, s, act, gact, gpack, gsh, gnorm) -> torch.Tensor:
        """One step back: G = dL/d(step output) in, dL/d(step input) out; the weight gradients
        accumulate into gpack / gnorm and dL/d shared into gsh."""
        lay, N, C, HW, K, off = self.lay, self.N, self.lay.C, self.lay.HW, self.K, self.offsets
        ra = _active(lay, self.depths, s)
        mr = max(ra) if ra else 0
        cdt, gdt = accumulation_dtype(self.x.dtype), grad_dtype(self.x.dtype)
        gx = G.to(cdt).contiguous() if G.dtype != cdt else G.clone()
        if mr == 0:
            return gx
        perm0 = self.perm if s == 0 else None
        self.qkv_attn(src, s, act)
        attn, gattn = self.attn_view(act), self.attn_view(gact)
        gt, gu, h = (torch.empty(max(lay.R, 1), dtype=gdt, device=self.dev) for _ in range(3))
        K.epilogue_backward(G, self.shared, attn, self.wp, gt, gu, h, off,
                            self._meta(("epilogue", s), lambda: _epilogue_rows(lay, ra)), self.perm, self.k, N, C,
                            HW, mr)
        meta = functools.partial(self._backward_meta, s, ra)
        K.gemm(gt, self.wp, None, gattn, off, meta("d_attn"), N, HW, mr)
        K.wgrad(gt, attn, gpack, gpack, off, meta("w_proj_out"), HW, mr, mr, N)
        K.gemm(gu, self.wp, None, gsh, off, meta("d_shared"), N, HW, C, accumulate=True)
        K.wgrad(gu, self.shared, gpack, None, off, meta("w_proj1"), HW, mr, C, N, perm=self.perm, kslots=self.k)
        K.wgrad(G, h, gpack, None, off, meta("w_proj2"), HW, C, mr, N)
        self._attention_backward(ra, act, gact, gnorm)
        gy = torch.empty(max(3 * lay.R, 1), dtype=gdt, device=self.dev)
        for kv in (False, True):
            K.pwdw_backward(src, self.wp, self.wp, None, gact, gy, gpack, gpack, off,
                            self._meta(("pwdw", s, kv), lambda: _pwdw_rows(lay, ra, kv)), N, self.H, self.W,
                            lay.kkv if kv else lay.kq, 2 * mr if kv else mr, perm=perm0, kslots=self.k)
        K.wgrad(gy, src, gpack, None, off, meta("w_eff"), HW, 3 * mr, C, N, perm=perm0, kslots=self.k)
        K.gemm(gy, self.wp, None, gx, off, meta("d_src"), N, HW, C, accumulate=True)
        return gx

    def _backward_meta(self, s: int, ra: List[int], name: str) -> torch.Tensor:
        """Meta table ``name`` of step s's backward gemm / wgrad launches (active ranks ``ra``)."""
        return self._meta(("backward", s, name), lambda: _backward_rows(self.lay, ra, name))

    def _attention_backward(self, ra: List[int], act: torch.Tensor, gact: torch.Tensor,
                            gnorm: List[torch.Tensor]) -> None:
        """dL/d(q, k, v) into gact from dL/d attn (gact's attention region), per active expert."""
        for e, r in enumerate(ra):
            if r == 0:
                continue
            w = self.experts[e]
            q, k, v = self._views(act, e, 3)
            gq, gk, gv, gattn = self._views(gact, e, 4)
            gw, gb = self.K.attention_rows_backward(gattn, q, k, v, self.windows[e], w.norm_weight, w.norm_bias, EPS,
                                                    gq, gk, gv, self.offsets[e:e + 2])
            gnorm[e][0] += gw.to(gnorm[e].dtype)
            gnorm[e][1] += gb.to(gnorm[e].dtype)

    def _weight_grads(self, gpack: torch.Tensor, gnorm: List[torch.Tensor]) -> List[ExpertWeights]:
        """Unpack the accumulated gradients; undo the W_eff fold: dW_cat = dW_eff proj0^T, d proj0 = W_cat^T dW_eff."""
        lay, C, out = self.lay, self.lay.C, []
        for e, (w, r) in enumerate(zip(self.experts, lay.ranks)):
            o, sz = lay.w[e], _sizes(C, r, lay.kq, lay.kkv)
            g = {n: gpack[o[n]:o[n] + sz[n]] for n in PACKED}
            d_w_eff = g.pop("w_eff").view(3 * r, C)
            d_w_cat = d_w_eff @ w.proj0.reshape(r, C).to(gpack.dtype).t()
            grads = dict(g, proj0=_w_cat(w, gpack.dtype).t() @ d_w_eff, q=d_w_cat[:r], kv=d_w_cat[r:],
                         norm_weight=gnorm[e][0], norm_bias=gnorm[e][1])
            out.append(ExpertWeights(**{n: _to(grads[n], getattr(w, n)) for n in ExpertWeights._fields}))
        return out


def _to(acc: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Accumulator -> a fresh output shaped and typed like ``like`` (poisonable allocation)."""
    out = new_output(like.shape, like.dtype, like.device)
    out.copy_(acc.reshape(like.shape))
    return out


def experts_forward(kernels: ExpertStageKernels, x, shared, perm, offsets, k: int, experts: Sequence[ExpertWeights],
                    windows: Sequence[int], depths: Sequence[int]) -> torch.Tensor:
    """(B*k, C, H, W) rows of the expert stage (see the module docstring); no host synchronisation."""
    return _Stage(kernels, x, shared, perm, offsets, k, experts, windows, depths).forward()[0]


def experts_backward(kernels: ExpertStageKernels, grad, x, shared, perm, offsets, k: int,
                     experts: Sequence[ExpertWeights], windows: Sequence[int], depths: Sequence[int]
                     ) -> Tuple[torch.Tensor, torch.Tensor, List[ExpertWeights]]:
    """(grad_x, grad_shared, the gradient of every expert's weights) (zeros for idle experts)."""
    return _Stage(kernels, x, shared, perm, offsets, k, experts, windows, depths).backward(grad.contiguous())


# ----------------------------------------------------------------------------- the plain / gated ops (E = 1)
def _one_group(B: int, device: torch.device) -> torch.Tensor:
    """``offsets`` of a single group of B rows."""
    return cached_table(("one_group", B), lambda: [[0, B]], device)[0]


def _conv_row(c_in: int, c_out: int, HW: int, out_ch: int) -> Tuple[int, ...]:
    """``PwDwCol`` row of one group: src (B, c_in, HW), out (B, out_ch, HW), gy (B, c_out, HW)."""
    return meta_row(PwDwCol, C_IN=c_in, C_OUT=c_out, PW_WEIGHT=0, DW_WEIGHT=0, PW_BIAS=0, DW_BIAS=0, SRC=0,
                    SRC_ROW_STRIDE=c_in * HW, OUT=0, OUT_SPLIT=out_ch, OUT_SPLIT_STRIDE=0, OUT_ROW_STRIDE=out_ch * HW,
                    GRAD_PW=0, GRAD_PW_ROW_STRIDE=c_out * HW)


def _conv_meta(c_in: int, c_out: int, HW: int, out_ch: int, device: torch.device) -> torch.Tensor:
    """The device table of :func:`_conv_row`, built once per arguments."""
    return cached_table(("conv", c_in, c_out, HW, out_ch), lambda: [_conv_row(c_in, c_out, HW, out_ch)], device)


def pwdw_forward(kernels: ExpertStageKernels, x, pw_weight, dw_weight, pw_bias, dw_bias, gated: bool) -> torch.Tensor:
    """pointwise_depthwise_conv(_gated) forward: one fused launch."""
    B, c_in, H, W = x.shape
    c_out, ks = pw_weight.shape[0], dw_weight.shape[-1]
    n_out = c_out // 2 if gated else c_out
    out = new_output((B, n_out, H, W), x.dtype, x.device)
    meta = _conv_meta(c_in, c_out, H * W, n_out, x.device)
    kernels.pwdw(x, pw_weight, dw_weight, pw_bias, dw_bias, out, _one_group(B, x.device), meta, B, H, W, ks, n_out,
                 mode=PwDwMode.GATED if gated else PwDwMode.PLAIN)
    return out


def pwdw_backward(kernels: ExpertStageKernels, grad, x, pw_weight, dw_weight, pw_bias, dw_bias,
                  gated: bool) -> List[torch.Tensor]:
    """Backward: (gated: recompute a, b and write dL/d(a, b)); recompute the 1x1 halo, dL/dy and the
    depthwise weight/bias grads in one launch; then the 1x1's weight/bias grad and dL/dx."""
    B, c_in, H, W = x.shape
    c_out, ks = pw_weight.shape[0], dw_weight.shape[-1]
    HW, dev, cdt, gdt = H * W, x.device, accumulation_dtype(x.dtype), grad_dtype(x.dtype)
    offsets = _one_group(B, dev)
    if gated:
        go = torch.empty((B, c_out, H, W), dtype=gdt, device=dev)
        kernels.pwdw(x, pw_weight, dw_weight, pw_bias, dw_bias, go, offsets,
                     _conv_meta(c_in, c_out, HW, c_out // 2, dev), B, H, W, ks, c_out // 2,
                     mode=PwDwMode.GATED_BACKWARD, g=grad, gofull=go)
    else:
        go = grad
    gy = torch.empty((B, c_out, H, W), dtype=gdt, device=dev)
    gdw = torch.zeros(dw_weight.shape, dtype=cdt, device=dev)
    gdb = torch.zeros((c_out,), dtype=cdt, device=dev) if dw_bias is not None else None
    kernels.pwdw_backward(x, pw_weight, dw_weight, pw_bias, go, gy, gdw, gdb, offsets,
                          _conv_meta(c_in, c_out, HW, c_out, dev), B, H, W, ks, c_out)
    gpw = torch.zeros((c_out, c_in), dtype=cdt, device=dev)
    gpb = torch.zeros((c_out,), dtype=cdt, device=dev) if pw_bias is not None else None
    kernels.wgrad(gy, x, gpw, gpb, offsets, cached_table(("conv_wgrad", c_out, c_in, HW), lambda: [
        _wgrad_row(c_out, c_in, 0, 0, c_out * HW, 0, c_in * HW)], dev), HW, c_out, c_in, B)
    gx = new_output(x.shape, x.dtype, dev)
    kernels.gemm(gy, pw_weight, None, gx, offsets,
                 cached_table(("conv_dx", c_out, c_in, HW), lambda: [
                     gemm_t_row(c_out, c_in, 0, 0, c_out * HW, 0, c_in * HW)], dev), B, HW, c_in)
    res = [gx, _to(gpw, pw_weight), _to(gdw, dw_weight)]
    if pw_bias is not None:
        res.append(_to(gpb, pw_bias))
    if dw_bias is not None:
        res.append(_to(gdb, dw_bias))
    return res
