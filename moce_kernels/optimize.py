"""``moce_kernels.optimize(model)``: the fast inference path of a model, in one call.

What it does, by device:

* **Every device**: ``torch.compile`` (Inductor) of the model with this package's ops left opaque
  (they are ``torch.library`` ops: Inductor calls them as they are and fuses the elementwise glue
  around them: padding, residual adds, pixel (un)shuffles, the frequency embedding). Shapes are
  static: each new input shape (B, C, H, W) and dtype compiles once (seconds on a GPU, up to a minute
  or more for MoCE-IR on a CPU), for at most ``max_shapes`` shapes; further new shapes run the eager
  model (a warning says so once). ``max_shapes`` cannot exceed ``torch._dynamo.config.recompile_limit``
  (8 by default), the number of versions Dynamo keeps of one function.
* **CUDA**: on top, one CUDA graph per input shape (``cuda_graphs=True``, the default there): the
  whole forward replays as one launch. This needs a forward without host synchronisation, which the
  routed expert stage provides (routing and dispatch stay on the device). At most ``max_shapes``
  graphs are kept (least recently used first out, which frees its memory). Inputs are copied into the
  graph's static input and the output is copied out, so callers may keep and modify both. Inside a
  ``record_routes`` / ``fixed_routes`` block of the calling thread (``restore()``'s routing pass and
  tiles) the compiled forward runs without a graph: a graph would replay the routes it was captured with.
* **CPU**: no graphs (there are none on a CPU).

The result computes what the eager model computes (within the error rule of DESIGN.md: Inductor may
sum the glue in another order). It is for inference: gradients are not recorded, and a model in
training mode is refused.
"""
from __future__ import annotations

import collections
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

from . import allocator
from .model.fixed_routing import moce_layers
from .model.moe import ROUTE_OVERRIDES

_Key = Tuple[Tuple[int, ...], torch.dtype, torch.device]


class _GraphedForward:
    """A CUDA graph of ``fn`` for one input shape: static input and output buffers."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, warmup: int = 2):
        self.static_in = x.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # compilation, autotuning and allocations happen outside the capture
                fn(self.static_in)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


class OptimizedModel(nn.Module):
    """The wrapped model's inference forward, compiled and (on CUDA) graphed per input shape.

    ``self.model`` is the original module (its parameters are shared, not copied); the wrapper's
    ``training`` is the model's (``fast.eval()`` is ``model.eval()``). Dynamo keeps its
    compiled versions per Python function, so the shape budget is shared by every model compiled in
    the process.
    """

    def __init__(self, model: nn.Module, compile: bool = True, cuda_graphs: Optional[bool] = None,
                 max_shapes: int = 8):
        super().__init__()
        limit = torch._dynamo.config.recompile_limit
        if not 1 <= max_shapes <= limit:
            raise ValueError(f"max_shapes must be in [1, {limit}] (torch._dynamo.config.recompile_limit), "
                             f"got {max_shapes}")
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.max_shapes = max_shapes
        self._compiled = torch.compile(model, dynamic=False, fullgraph=True) if compile else model
        self._compiled_shapes: set = set()
        self._warned = False
        self._graphs: "collections.OrderedDict[_Key, _GraphedForward]" = collections.OrderedDict()
        self._layers = tuple(moce_layers(model).values())

    @property
    def training(self) -> bool:  # type: ignore[override]
        """The wrapped model's mode: the wrapper has none of its own (``train()``/``eval()`` set the model's)."""
        model = self.__dict__.get("_modules", {}).get("model")
        return bool(model is not None and model.training)

    @training.setter
    def training(self, mode: bool) -> None:
        model = self.__dict__.get("_modules", {}).get("model")
        if model is not None:  # None while nn.Module.__init__ runs, before the model is attached
            model.training = mode

    def reset(self) -> None:
        """Drop the CUDA graphs (after moving the model or replacing its parameter tensors; weights
        loaded in place need no reset). Compiled code re-checks its guards by itself."""
        self._graphs.clear()

    def _forward_fn(self, key: _Key) -> Callable[[torch.Tensor], torch.Tensor]:
        """The compiled forward for a shape within the budget, else the eager model."""
        if key in self._compiled_shapes or len(self._compiled_shapes) < self.max_shapes:
            self._compiled_shapes.add(key)
            return self._compiled
        if not self._warned:
            self._warned = True
            warnings.warn(f"optimize(): {self.max_shapes} input shapes are compiled already; new shapes run "
                          f"the eager model (seen: {sorted(k[0] for k in self._compiled_shapes)})")
        return self.model

    def routes_overridden(self) -> bool:
        """True inside this thread's record_routes / fixed_routes block on the model (no graphs then)."""
        active = ROUTE_OVERRIDES.active
        return bool(active) and any(layer in active for layer in self._layers)

    def _graphed(self, key: _Key, x: torch.Tensor) -> torch.Tensor:
        g = self._graphs.get(key)
        if g is None:
            if len(self._graphs) >= self.max_shapes:
                self._graphs.popitem(last=False)
            g = self._graphs[key] = _GraphedForward(self._forward_fn(key), x)
        self._graphs.move_to_end(key)
        return g(x)

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``model(x)`` without gradients (an ordinary tensor, not an inference tensor: callers may modify it
        in place, e.g. ``y.clamp_(0, 1)``); ``labels`` is accepted and ignored, as by :class:`MoCEIR`."""
        if self.model.training:
            raise RuntimeError("optimize() is for inference: call model.eval() first (train the eager model)")
        check = getattr(self.model, "_check_input", None)
        if check is not None:
            check(x)  # the model's own clear errors, before anything is compiled for a bad input
        if x.device.type == "cpu" and allocator.applied() is None:
            allocator.keep_cpu_memory()  # as MoCEIR's eager forward does (its compiled forward cannot)
        key = (tuple(x.shape), x.dtype, x.device)
        with torch.no_grad():
            use_graphs = x.is_cuda if self.cuda_graphs is None else self.cuda_graphs and x.is_cuda
            if use_graphs and not self.routes_overridden():
                return self._graphed(key, x)
            return self._forward_fn(key)(x)


def optimize(model: nn.Module, *, compile: bool = True, cuda_graphs: Optional[bool] = None,
             max_shapes: int = 8) -> OptimizedModel:
    """The fast inference path of ``model`` (see the module docstring for what it does on each device).

    Args:
        model: a :class:`moce_kernels.MoCEIR` (or any module whose eval forward is free of host
            synchronisation when CUDA graphs are used), in eval mode.
        compile: ``torch.compile`` the forward (Inductor, static shapes).
        cuda_graphs: replay a CUDA graph per input shape; ``None`` means yes for CUDA inputs.
        max_shapes: input shapes that get compiled code and a CUDA graph (least recently used graphs are
            dropped past it; shapes past it run eagerly).
    Returns:
        An :class:`OptimizedModel`; call it like the model.
    """
    return OptimizedModel(model, compile=compile, cuda_graphs=cuda_graphs, max_shapes=max_shapes)
