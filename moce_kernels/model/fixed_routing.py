"""Fixed routing for the MoCE layers: record every layer's routes in one forward, replay them in another.

A MoCE layer (:class:`~moce_kernels.model.moe.AdapterLayer`) routes each input row (image) on its
own, from that row's features. Two context managers change that for the forwards that the calling
thread runs inside a ``with`` block, by installing a per-thread override that :meth:`AdapterLayer.route`
consults (:data:`~moce_kernels.model.moe.ROUTE_OVERRIDES`; nothing is stored on the modules, so other
threads using the same model route as usual, and copies of the model made inside a block replay nothing):

- :func:`record_routes` lets every layer route and records, per layer, the route it took. With
  ``groups``, rows of the same group share one route: the layer routes each group once from the
  mean of the group's router inputs (the router is linear in them, so this is the mean of the
  rows' router logits, for rows of equal size), and every row of the group follows that route.
- :func:`fixed_routes` makes every layer follow given routes instead of its router: row ``b``
  takes the route of entry ``rows[b]``.

A route is (gates (G, k), indices (G, k), noise-free logits (G, E)) per layer, for G groups or
images. Routes stay device tensors and rows are mapped to them by device-side indexing, so neither
block synchronises with the host: a forward with fixed routes stays capturable in a CUDA graph.
Both are meant for inference: a fixed route has no gradient into the router and no auxiliary loss.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .moe import ROUTE_OVERRIDES, AdapterLayer


class Route(NamedTuple):
    """One MoCE layer's route for G images: gates (G, k), expert indices (G, k) int64, logits (G, E)."""

    gates: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor


Routes = Dict[str, Route]  # MoCE layer name (as in ``named_modules()``) -> its route


def moce_layers(model: nn.Module) -> Dict[str, AdapterLayer]:
    """The model's MoCE layers by module name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def cat_routes(parts: Sequence[Mapping[str, Route]]) -> Routes:
    """Routes of several image sets stacked along the image axis (same layers in every part)."""
    if not parts:
        raise ValueError("cat_routes needs at least one set of routes")
    names = list(parts[0])
    for p in parts[1:]:
        if list(p) != names:
            raise ValueError(f"route sets name different MoCE layers: {names} vs {list(p)}")
    return {n: Route(*(torch.cat([p[n][i] for p in parts]) for i in range(3))) for n in names}


def _route_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Recorder:
    """Override that routes as the layer would (per row, or per group of rows) and records the route."""

    def __init__(self, name: str, sink: Routes, groups: Optional[torch.Tensor], num_groups: int):
        self.name, self.sink, self.groups, self.num_groups = name, sink, groups, num_groups

    def __call__(self, layer: AdapterLayer, x: torch.Tensor, freq_emb: torch.Tensor):
        if self.groups is None:
            gates, indices, logits, loss = layer.router(x, freq_emb)
            self.sink[self.name] = Route(gates, indices, logits)
            return gates, indices, logits, loss
        groups = self.groups.to(x.device)
        if groups.shape != (x.shape[0],):
            raise ValueError(f"{self.name}: groups must have one entry per input row, shape ({x.shape[0]},); "
                             f"got {tuple(groups.shape)}")
        ids = torch.arange(self.num_groups, device=x.device)
        member = (groups[None, :] == ids[:, None]).to(x.dtype)  # (G, B)
        mean = member / member.sum(1, keepdim=True).clamp_min(1)
        pooled_x = (mean @ x.mean((2, 3)))[:, :, None, None]  # (G, C, 1, 1): its spatial mean is itself
        pooled_f = mean.to(freq_emb.dtype) @ freq_emb
        gates, indices, logits, loss = layer.router(pooled_x, pooled_f)
        self.sink[self.name] = Route(gates, indices, logits)
        return gates.index_select(0, groups), indices.index_select(0, groups), logits.index_select(0, groups), loss


class _Replay:
    """Override that follows a given route: row b takes entry ``rows[b]`` (or entry b without rows)."""

    def __init__(self, name: str, route: Route, rows: Optional[torch.Tensor]):
        self.name, self.route, self.rows = name, route, rows

    def __call__(self, layer: AdapterLayer, x: torch.Tensor, freq_emb: torch.Tensor):
        B = x.shape[0]
        gates, indices, logits = (t.to(x.device) for t in self.route)
        if self.rows is None:
            if gates.shape[0] != B:
                raise ValueError(f"{self.name}: fixed routes are for {gates.shape[0]} images but the input has "
                                 f"{B} rows; pass rows= to map rows to routes")
        else:
            if self.rows.shape != (B,):
                raise ValueError(f"{self.name}: rows must have one entry per input row, shape ({B},); "
                                 f"got {tuple(self.rows.shape)}")
            rows = self.rows.to(x.device)
            gates, indices, logits = (t.index_select(0, rows) for t in (gates, indices, logits))
        dt = _route_dtype(x)
        return gates.to(dt), indices, logits.to(dt), x.new_zeros((), dtype=dt)


@contextlib.contextmanager
def _overridden(model: nn.Module, make: Callable[[str, AdapterLayer], Callable]) -> Iterator[None]:
    """Within the block, this thread's forwards route ``model``'s MoCE layers with ``make(name, layer)``."""
    layers = moce_layers(model)
    outer = ROUTE_OVERRIDES.active
    busy = [n for n, layer in layers.items() if layer in outer]
    if busy:
        raise RuntimeError(f"routes are already being recorded or fixed on {busy[0]} (a block of "
                           "record_routes / fixed_routes is open in this thread); these blocks do not nest")
    ROUTE_OVERRIDES.active = {**outer, **{layer: make(name, layer) for name, layer in layers.items()}}
    try:
        yield
    finally:
        ROUTE_OVERRIDES.active = outer


@contextlib.contextmanager
def record_routes(model: nn.Module, groups: Optional[torch.Tensor] = None,
                  num_groups: Optional[int] = None) -> Iterator[Routes]:
    """Record each MoCE layer's route during this thread's forwards in the block; yields the (filled-in) dict.

    Without ``groups`` every row routes on its own, exactly as without the block, and each layer's
    route has one entry per row. With ``groups`` ((B,) int64 tensor of values in [0, num_groups),
    on the input's device) the rows of a group share one route, decided from their mean router
    input; each layer's route then has ``num_groups`` entries. A later forward overwrites the record.
    """
    if groups is not None:
        if not isinstance(groups, torch.Tensor) or groups.dim() != 1 or groups.dtype != torch.int64:
            raise ValueError(f"groups must be a 1-D int64 tensor, got {getattr(groups, 'dtype', type(groups))} "
                             f"of shape {tuple(getattr(groups, 'shape', ()))}")
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int when groups is given, got {num_groups!r}")
    routes: Routes = {}
    with _overridden(model, lambda name, layer: _Recorder(name, routes, groups, num_groups or 0)):
        yield routes


def _check_route(name: str, layer: AdapterLayer, route: Route) -> None:
    gates, indices, logits = route
    G, k, E = gates.shape[0], layer.top_k, layer.num_experts
    if gates.shape != (G, k) or indices.shape != (G, k) or logits.shape != (G, E):
        raise ValueError(f"route for {name} must be gates ({G}, {k}), indices ({G}, {k}), logits ({G}, {E}) "
                         f"(top-{k} of {E} experts); got {tuple(gates.shape)}, {tuple(indices.shape)}, "
                         f"{tuple(logits.shape)}")
    if indices.dtype != torch.int64:
        raise ValueError(f"route for {name}: indices must be int64, got {indices.dtype}")


@contextlib.contextmanager
def fixed_routes(model: nn.Module, routes: Mapping[str, Route],
                 rows: Optional[torch.Tensor] = None) -> Iterator[None]:
    """Run every MoCE layer with the given routes (one per layer name, as :func:`record_routes` yields)
    in this thread's forwards inside the block (other threads' forwards route on their own).

    ``rows`` ((B,) int64 tensor, ideally on the input's device) maps input row b to route entry
    ``rows[b]``; without it row b takes entry b. The gates are used as given (not renormalised).
    """
    layers = moce_layers(model)
    missing: List[str] = [n for n in layers if n not in routes]
    unknown: List[str] = [n for n in routes if n not in layers]
    if missing or unknown:
        raise ValueError(f"routes do not match the model's MoCE layers: missing {missing[:4]}, unknown {unknown[:4]}")
    for name, layer in layers.items():
        _check_route(name, layer, Route(*routes[name]))
    if rows is not None and (not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype != torch.int64):
        raise ValueError(f"rows must be a 1-D int64 tensor, got {getattr(rows, 'dtype', type(rows))}")
    with _overridden(model, lambda name, layer: _Replay(name, Route(*routes[name]), rows)):
        yield
