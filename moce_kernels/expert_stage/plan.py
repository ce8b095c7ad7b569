"""The expert stage of one MoCE layer as a plan: what the host builds once per layer, not per call.

An :class:`ExpertPlan` holds, for one layer's expert weight tensors on one device and dtype:
  - the packed weights (``PACKED`` per expert, W_eff = [q; kv] @ proj0 folded in the accumulation
    dtype), one flat device buffer;
  - the layout of every shape class (N rows of H x W pixels) it has run, and the meta tables of its
    launches there: those come from the process-wide :func:`~.tables.cached_table`, keyed by what
    determines their rows (channels, ranks, kernel sizes, depths, shape class), so plans of layers
    alike (and a training step's per-call plans) share them.

:func:`plan_for` returns the plan of a call's weights: the same plan while every weight is the same
tensor (object, storage and ``_version``), with the same windows, depths, device and dtype. A
weight changed in place bumps its version and the packed buffer is rewritten *in place* (same
address); a new tensor, device, dtype, window or depth builds a new plan. While the current CUDA
stream captures a graph, the packing runs on every call (so the graph re-packs on each replay and
sees weights loaded in place) and the tables the launches read are pinned for the life of the
process (:class:`~.tables.TableCache`); a plan used in a capture is kept for the life of the process
once its weights are gone, since the graph still holds the address of its packed buffer.
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .tables import Rows, cached_table, capturing
from .weights import ExpertWeights, flatten

PACKED = ("w_eff", "q_dw", "kv_dw", "q_dw_bias", "kv_dw_bias", "proj_out", "proj_out_bias", "proj1", "proj2")
"""Entries of an expert's block of packed weights, in order (W_eff: [q; kv] @ proj0, (3r, C))."""
EPS = 1e-5  # the experts' LayerNorm epsilon


@dataclass(frozen=True)
class WeightLayout:
    """Host-known sizes of one layer's experts and the packed-weight offset of each entry of PACKED."""
    C: int
    ranks: Tuple[int, ...]
    kq: int
    kkv: int
    w: Tuple[Dict[str, int], ...]  # per expert: packed-weight offset of each entry of PACKED
    w_total: int


@dataclass(frozen=True)
class Layout:
    """A :class:`WeightLayout` at one shape class: N rows of (C, H, W), and the activation buffers."""
    C: int
    N: int
    HW: int
    ranks: Tuple[int, ...]
    kq: int
    kkv: int
    w: Tuple[Dict[str, int], ...]
    w_total: int
    rb: Tuple[int, ...]  # per expert: base of its (N, r, H, W) block in a rank-sized buffer
    R: int


def _sizes(C: int, r: int, kq: int, kkv: int) -> Dict[str, int]:
    return {"w_eff": 3 * r * C, "q_dw": r * kq * kq, "kv_dw": 2 * r * kkv * kkv, "q_dw_bias": r, "kv_dw_bias": 2 * r,
            "proj_out": r * r, "proj_out_bias": r, "proj1": r * C, "proj2": C * r}


def weight_layout(C: int, experts: Sequence[ExpertWeights]) -> WeightLayout:
    """Lay out the packed weights of ``experts`` over C channels (the op layer has checked every
    weight's shape)."""
    ranks = tuple(w.rank for w in experts)
    kqs, kkvs = {w.q_dw.shape[-1] for w in experts}, {w.kv_dw.shape[-1] for w in experts}
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
    return WeightLayout(C, ranks, kq, kkv, tuple(offs), pos)


def shape_layout(wl: WeightLayout, N: int, HW: int) -> Layout:
    """``wl`` at N rows of HW pixels."""
    rb, acc = [], 0
    for r in wl.ranks:
        rb.append(acc)
        acc += N * r * HW
    return Layout(wl.C, N, HW, wl.ranks, wl.kq, wl.kkv, wl.w, wl.w_total, tuple(rb), acc)


def make_layout(x: torch.Tensor, N: int, experts: Sequence[ExpertWeights]) -> Layout:
    """The layout of ``experts`` for N rows shaped like ``x``'s (C, H, W)."""
    return shape_layout(weight_layout(x.shape[1], experts), N, x.shape[2] * x.shape[3])


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of intermediate gradient buffers: the input's for 16-bit inputs (as the reference's own
    autograd rounds them), else the accumulation dtype."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else accumulation_dtype(dtype)


def _w_cat(w: ExpertWeights, dtype: torch.dtype) -> torch.Tensor:
    """[q; kv] as a (3r, r) matrix."""
    r = w.rank
    return torch.cat([w.q.reshape(r, r), w.kv.reshape(2 * r, r)]).to(dtype)


def pack_weights(wl: WeightLayout, experts: Sequence[ExpertWeights], dtype: torch.dtype,
                 out: torch.Tensor) -> torch.Tensor:
    """Every expert's weights into the flat buffer ``out`` (``max(w_total, 1)`` elements of ``dtype``)
    in PACKED order, W_eff folded in the accumulation dtype; returns ``out``."""
    parts = []
    cdt = accumulation_dtype(dtype)
    with torch.no_grad():
        for w in experts:
            w_eff = (_w_cat(w, cdt) @ w.proj0.reshape(w.rank, wl.C).to(cdt)).to(dtype)
            parts += [w_eff] + [getattr(w, name) for name in PACKED[1:]]
        if parts:
            torch.cat([t.reshape(-1).to(dtype) for t in parts], out=out)
        else:
            out.zero_()
    return out


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def _signature(flat: Sequence[torch.Tensor]) -> Tuple[List[int], List[int], List[int]]:
    """What identifies the weights' current contents: objects, storages and versions."""
    return list(map(id, flat)), list(map(_DATA_PTR, flat)), list(map(_VERSION, flat))


class ExpertPlan:
    """Packed weights and meta tables of one layer's experts (see the module docstring)."""

    def __init__(self, experts: Sequence[ExpertWeights], flat: Sequence[torch.Tensor], windows: Sequence[int],
                 depths: Sequence[int], C: int, dtype: torch.dtype, device: torch.device):
        # strong references to all but the first weight (whose death retires the plan): no id in
        # self.sig can be reused by another tensor while the plan is in use
        self._others = list(flat[1:])
        self.windows, self.depths = list(windows), list(depths)
        self.dtype, self.device = dtype, device
        self.wl = weight_layout(C, experts)
        self.wp = torch.empty(max(self.wl.w_total, 1), dtype=dtype, device=device)
        pack_weights(self.wl, experts, dtype, self.wp)
        self.sig = _signature(flat)
        self.captured = False  # used while a CUDA graph was captured
        self.retired = False   # dropped from the plans in use
        self._table_key = (C, self.wl.ranks, self.wl.kq, self.wl.kkv, tuple(self.depths))
        self._layouts: Dict[Tuple[int, int], Layout] = {}

    def matches(self, flat: Sequence[torch.Tensor], windows: Sequence[int], depths: Sequence[int],
                dtype: torch.dtype, device: torch.device) -> bool:
        """Same tensors (and storages), windows, depths, dtype and device: versions may differ."""
        sig = self.sig
        return (list(map(id, flat)) == sig[0] and list(map(_DATA_PTR, flat)) == sig[1] and dtype == self.dtype
                and device == self.device and list(windows) == self.windows and list(depths) == self.depths)

    def refresh(self, experts: Sequence[ExpertWeights], flat: Sequence[torch.Tensor], capture: bool) -> None:
        """Re-pack ``experts`` (whose tensors are ``flat``, those the plan matches) in place when a
        weight's version changed since the last pack, or always while capturing (the graph then
        re-packs at each replay)."""
        versions = list(map(_VERSION, flat))
        if capture or versions != self.sig[2]:
            pack_weights(self.wl, experts, self.dtype, self.wp)
            self.sig = (self.sig[0], self.sig[1], versions)
        if capture:
            self.captured = True

    def layout(self, N: int, HW: int) -> Layout:
        """The layout of N rows of HW pixels (built once per shape class)."""
        lay = self._layouts.get((N, HW))
        if lay is None:
            lay = self._layouts[(N, HW)] = shape_layout(self.wl, N, HW)
        return lay

    def table(self, key: Tuple, rows: Callable[[], Rows]) -> torch.Tensor:
        """The meta table named ``key`` (which includes the shape class) of this plan's weight layout
        and depths, built once from ``rows()``."""
        return cached_table(self._table_key + key, rows, self.device)


_PLANS: Dict[int, ExpertPlan] = {}
_RETIRED: List[ExpertPlan] = []  # plans a captured CUDA graph may still read, kept for the process's life


def _retire(key: int, plan_ref: "weakref.ref[ExpertPlan]") -> None:
    """Drop the plan from :data:`_PLANS` (keeping it in :data:`_RETIRED` if a graph captured it)."""
    plan = plan_ref()
    if plan is None:
        return
    if _PLANS.get(key) is plan:
        del _PLANS[key]
    if plan.captured and not plan.retired:
        plan.retired = True
        _RETIRED.append(plan)


def plan_for(experts: Sequence[ExpertWeights], windows: Sequence[int], depths: Sequence[int], C: int,
             dtype: torch.dtype, device: torch.device) -> ExpertPlan:
    """The current plan of these weights (see the module docstring), built or re-packed as needed.

    A plan is found by its layer's first weight tensor and lives while that tensor does."""
    flat = flatten(experts)
    capture = capturing(device)
    if not flat:
        return ExpertPlan(experts, flat, windows, depths, C, dtype, device)
    key = id(flat[0])
    plan = _PLANS.get(key)
    if plan is None or not plan.matches(flat, windows, depths, dtype, device):
        if plan is not None:
            _retire(key, weakref.ref(plan))
        plan = ExpertPlan(experts, flat, windows, depths, C, dtype, device)
        _PLANS[key] = plan
        weakref.finalize(flat[0], _retire, key, weakref.ref(plan))
    plan.refresh(experts, flat, capture)
    return plan
