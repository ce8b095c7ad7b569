"""The MoCE layer (``AdapterLayer``): router, complexity experts, gated combine, output projection."""
from __future__ import annotations

import math
import threading
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn

from .. import ops
from ..nvtx import annotate
from .layers import FFTAttention

ROUTING_NOISE = ("train", "always", "never")


class _RouteOverrides(threading.local):
    """Per thread: the MoCE layers whose routing an open block of :mod:`moce_kernels.model.fixed_routing`
    replaces, each mapped to its override, called as ``override(layer, x, freq_emb)``.

    Thread-local rather than on the modules, so one model serves several threads, each with its own
    routes (a new thread starts with none), and a copy or ``torch.save`` of a model carries none.
    A thread-local rather than a ``ContextVar`` because ``torch.compile`` traces it (guarding on the
    calling thread's value); asyncio tasks of one thread therefore share it: do not hold a block across
    an ``await``. The blocks replace ``active`` as a whole (never mutate it in place).
    """

    active: Dict["AdapterLayer", Callable] = {}


ROUTE_OVERRIDES = _RouteOverrides()


class ModExpert(nn.Module):
    """Complexity expert (rank r, window p): ``x + pw_2(body(pw_0(x)) * silu(pw_1(shared)))``,
    applied ``depth`` times in a chain."""

    def __init__(self, dim: int, rank: int, depth: int, patch_size: int):
        super().__init__()
        self.depth = depth
        self.patch_size = patch_size
        self.proj = nn.ModuleList([nn.Conv2d(dim, rank, 1, bias=False), nn.Conv2d(dim, rank, 1, bias=False),
                                   nn.Conv2d(rank, dim, 1, bias=False)])
        self.body = FFTAttention(rank, patch_size=patch_size)

    def weights(self) -> ops.ExpertWeights:
        """The expert's 13 tensors by name (the ``moe_experts`` contract).

        Read from the modules' own ``_modules`` / ``_parameters`` dicts (what ``nn.Module.__getattr__``
        returns for them, without its Python call per name); a tensor that is not a registered
        parameter there (a parametrization, a buffer, a plain attribute) takes the attribute path."""
        try:
            proj, body = self._modules["proj"]._modules, self._modules["body"]._modules
            q_dw, kv_dw = body["q_dwconv"]._parameters, body["kv_dwconv"]._parameters
            norm, out = body["norm"]._modules["body"]._parameters, body["proj_out"]._parameters
            return ops.ExpertWeights(
                proj["0"]._parameters["weight"], proj["1"]._parameters["weight"], proj["2"]._parameters["weight"],
                body["q"]._parameters["weight"], q_dw["weight"], q_dw["bias"], body["kv"]._parameters["weight"],
                kv_dw["weight"], kv_dw["bias"], norm["weight"], norm["bias"], out["weight"], out["bias"])
        except KeyError:
            return self._weights_by_attribute()

    def _weights_by_attribute(self) -> ops.ExpertWeights:
        b = self.body
        return ops.ExpertWeights(
            proj0=self.proj[0].weight, proj1=self.proj[1].weight, proj2=self.proj[2].weight, q=b.q.weight,
            q_dw=b.q_dwconv.weight, q_dw_bias=b.q_dwconv.bias, kv=b.kv.weight, kv_dw=b.kv_dwconv.weight,
            kv_dw_bias=b.kv_dwconv.bias, norm_weight=b.norm.body.weight, norm_bias=b.norm.body.bias,
            proj_out=b.proj_out.weight, proj_out_bias=b.proj_out.bias)


def expert_depths(depth_type: Union[str, int], stage_depth: int, n: int) -> List[int]:
    """Per-expert depth for each ``depth_type`` the authors accept."""
    if isinstance(depth_type, int) and not isinstance(depth_type, bool):
        return [depth_type] * n
    table = {
        "lin": lambda i: stage_depth + i,
        "double": lambda i: stage_depth + 2 * i,
        "exp": lambda i: 2 ** i,
        "fact": lambda i: math.factorial(i + 1),
        "constant": lambda i: stage_depth,
    }
    if depth_type not in table:
        raise ValueError(f"depth_type must be an int or one of {sorted(table)}, got {depth_type!r}")
    return [table[depth_type](i) for i in range(n)]


def expert_ranks(rank_type: str, rank: int, dim: int, n: int) -> List[int]:
    """Per-expert rank for each ``rank_type`` the authors accept."""
    table = {
        "constant": lambda i: rank,
        "lin": lambda i: rank + i,
        "double": lambda i: rank + 2 * i,
        "exp": lambda i: rank ** (i + 1),
        "fact": lambda i: math.factorial(rank + i),
        "spread": lambda i: dim // (2 ** (n - 1 - i)),
    }
    if rank_type not in table:
        raise ValueError(f"rank_type must be one of {sorted(table)}, got {rank_type!r}")
    ranks = [table[rank_type](i) for i in range(n)]
    if min(ranks) < 1:
        raise ValueError(f"rank_type {rank_type!r} with dim {dim} gives ranks {ranks}; every rank must be >= 1")
    return ranks


class ExpertUsage:
    """Which experts received an image in one training forward, for every MoCE layer of a model.

    The expert stage's gradient for an expert that got no image is zero, but the authors' model leaves
    such an expert out of the autograd graph, so its parameters get ``grad None`` and optimizers skip
    them (AdamW applies no weight decay or momentum; gradient accumulation keeps what earlier
    micro-batches left). To follow that trajectory exactly, each layer records its per-expert image
    counts (device tensors, no synchronisation in the forward), and the backward turns the gradients of
    unused experts into ``None``: the first layer to need the counts copies every layer's to the host
    in one transfer, so a training step synchronises once. Eval and ``torch.no_grad`` record nothing.
    A ``torch.compile`` graph cannot hold that host read: compiled, the unused experts' gradients are
    zeros (as the expert stage computes them), so optimizers with weight decay or momentum move them.
    Under ``torch.func`` transforms a ``None`` gradient reaches the caller as zeros (``torch.func.grad``
    fills them in).

    ``DistributedDataParallel`` needs ``find_unused_parameters=True``: its reducer then treats a ``None``
    gradient as "not used on this rank", all-reduces the used flags, averages the gradients of experts
    some rank used (the others contribute zeros, which is their gradient) and leaves ``None`` on the
    experts no rank used, which is the single-process trajectory. The counts stay per rank here: the
    reducer already combines the ranks. With ``find_unused_parameters=False`` or ``static_graph=True``
    the reducer writes zeros over the ``None`` gradients (or fixes the unused set at the first step), so
    a forward under such a DDP raises (:meth:`check_ddp`).
    """

    def __init__(self) -> None:
        self._counts: List[torch.Tensor] = []
        self._used: Optional[List[List[bool]]] = None
        self._ddp_checked = False

    def check_ddp(self, weight: torch.Tensor) -> None:
        """Raise if ``weight`` (an expert parameter) is trained by the ``DistributedDataParallel`` whose
        forward is running and that DDP would overwrite ``None`` gradients (checked once per forward)."""
        if self._ddp_checked:
            return
        self._ddp_checked = True
        ddp = _active_ddp()
        if ddp is None or (ddp.find_unused_parameters and not ddp.static_graph):
            return
        if any(p is weight for p in ddp.module.parameters()):
            setting = "static_graph=True" if ddp.static_graph else "find_unused_parameters=False"
            raise RuntimeError(
                f"MoCEIR is trained under DistributedDataParallel with {setting}: DDP would give the experts "
                "that a step routes no image to zero gradients instead of None, and AdamW's weight decay and "
                "momentum would move them (the authors' model fails here too). Wrap the model with "
                "DistributedDataParallel(model, find_unused_parameters=True) (and static_graph=False); in "
                "Lightning use Trainer(strategy=\"ddp_find_unused_parameters_true\").")

    def record(self, counts: torch.Tensor) -> int:
        """Keep one layer's (E,) image counts; returns the layer's slot."""
        self._counts.append(counts)
        return len(self._counts) - 1

    def used(self, slot: int) -> List[bool]:
        """Per expert of layer ``slot``: did it get an image? (host read on first call only)"""
        if self._used is None:
            self._used = self._read_counts()
        return self._used[slot]

    def _read_counts(self) -> List[List[bool]]:
        flat = torch.cat(self._counts).gt(0).tolist()  # the one synchronisation of the step
        out, start = [], 0
        for c in self._counts:
            out.append(flat[start:start + c.numel()])
            start += c.numel()
        return out


def _active_ddp() -> Optional[torch.nn.parallel.DistributedDataParallel]:
    """The ``DistributedDataParallel`` whose forward is running (None outside one, or without
    torch.distributed)."""
    if not torch.distributed.is_available():
        return None
    return getattr(torch.nn.parallel.DistributedDataParallel, "_active_ddp_module", None)


class _NoGradForUnusedExperts(torch.autograd.Function):
    """Identity on an expert stage's weights whose backward returns ``None`` for the weights of experts
    that got no image in this forward (see :class:`ExpertUsage`)."""

    @staticmethod
    def forward(usage: ExpertUsage, slot: int, per_expert: int, *weights: torch.Tensor):
        usage.check_ddp(weights[0])
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.usage, ctx.slot, ctx.per_expert = inputs[:3]

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        used = ctx.usage.used(ctx.slot)
        return (None, None, None) + tuple(g if used[i // ctx.per_expert] else None for i, g in enumerate(grads))


class RoutingFunction(nn.Module):
    """Parameters of the per-image router (the computation is :func:`moce_kernels.ops.moe_route`)."""

    def __init__(self, dim: int, freq_dim: int, num_experts: int, k: int, complexity: torch.Tensor,
                 use_complexity_bias: bool = True, complexity_scale: str = "max"):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(dim, num_experts, bias=False))
        self.freq_gate = nn.Linear(freq_dim, num_experts, bias=False)
        if complexity_scale == "min":
            complexity = complexity / complexity.min()
        elif complexity_scale == "max":
            complexity = complexity / complexity.max()
        else:
            raise ValueError(f"complexity_scale must be 'min' or 'max', got {complexity_scale!r}")
        self.register_buffer("complexity", complexity.float())
        self.k = k
        self.num_experts = num_experts
        self.noise_std = 1.0 / num_experts
        self.use_complexity_bias = use_complexity_bias


class AdapterLayer(nn.Module):
    """MoCE layer: ``proj_out(sum_j gate_j * expert_{i_j}(x, shared))``, top-k per image.

    ``routing_noise``: ``"train"`` samples N(0, (1/E)^2) router noise only in training, ``"always"``
    also in eval (the authors' behaviour), ``"never"`` not at all; the noise scale enters the
    load-balancing loss in every case. After a training forward, ``self.loss`` is the auxiliary loss.
    """

    def __init__(self, dim: int, rank: int, num_experts: int = 4, top_k: int = 2, stage_depth: int = 1,
                 depth_type: Union[str, int] = "lin", rank_type: str = "constant", freq_dim: int = 128,
                 with_complexity: bool = False, complexity_scale: str = "min", routing_noise: str = "train"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {top_k}")
        self.top_k = top_k
        self.num_experts = num_experts
        self.routing_noise = routing_noise
        self.loss: torch.Tensor = torch.zeros(())
        self.usage: Optional[ExpertUsage] = None
        windows = [2 ** (i + 2) for i in range(num_experts)]
        depths = expert_depths(depth_type, stage_depth, num_experts)
        ranks = expert_ranks(rank_type, rank, dim, num_experts)
        # nn.Sequential keeps the authors' key layout: experts.<e>.0.<...>
        self.experts = nn.ModuleList([nn.Sequential(ModExpert(dim, r, d, p))
                                      for r, d, p in zip(ranks, depths, windows)])
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1, bias=False)
        complexity = torch.tensor([sum(p.numel() for p in e.parameters()) for e in self.experts], dtype=torch.float32)
        self.routing = RoutingFunction(dim, freq_dim, num_experts, top_k, complexity, with_complexity,
                                       complexity_scale)

    @property
    def routing_noise(self) -> str:
        return self._routing_noise

    @routing_noise.setter
    def routing_noise(self, mode: str) -> None:
        if mode not in ROUTING_NOISE:
            raise ValueError(f"routing_noise must be one of {ROUTING_NOISE}, got {mode!r}")
        self._routing_noise = mode

    def _sample_noise(self) -> bool:
        return self._routing_noise == "always" or (self._routing_noise == "train" and self.training)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], self.num_experts)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self._sample_noise():
            return torch.randn(shape, device=x.device, dtype=dt) * self.routing.noise_std
        return torch.zeros(shape, device=x.device, dtype=dt)

    def expert_modules(self) -> List[ModExpert]:
        """Each expert's module (the first, and only, module of its ``nn.Sequential``)."""
        return [next(iter(seq._modules.values())) for seq in self.experts._modules.values()]

    def expert_weights(self) -> List[ops.ExpertWeights]:
        return [e.weights() for e in self.expert_modules()]

    def route(self, x: torch.Tensor, freq_emb: torch.Tensor):
        """gates (B, k), indices (B, k), noise-free logits (B, E), aux loss () (0 in eval).

        The layer's own :meth:`router`, unless this thread is inside a block of
        :func:`~moce_kernels.model.fixed_routing.record_routes` or ``fixed_routes`` on this layer's
        model (recorded, shared or fixed routes; see that module and :class:`_RouteOverrides`).
        """
        override = ROUTE_OVERRIDES.active.get(self)
        if override is not None:
            return override(self, x, freq_emb)
        return self.router(x, freq_emb)

    def router(self, x: torch.Tensor, freq_emb: torch.Tensor):
        """The per-row router: gates (B, k), indices (B, k), noise-free logits (B, E), aux loss ()."""
        r = self.routing
        return ops.moe_route(x, freq_emb, r.gate[2].weight, r.freq_gate.weight, r.complexity, self._noise(x),
                             self.top_k, r.noise_std, self.training, r.use_complexity_bias)

    def run_experts(self, x: torch.Tensor, shared: torch.Tensor, indices: torch.Tensor):
        """Dispatch, expert stage: returns (expert rows (B*k, C, H, W), perm).

        When gradients are being recorded, experts that got no image end with ``grad None``, as in the
        authors' model (see :class:`ExpertUsage`; ``self.usage`` is the model-wide record of this forward,
        set by :class:`MoCEIR`, else one of this layer's own). Inside a ``torch.compile`` graph, which
        cannot hold that host read, their gradients are zeros instead."""
        counts, offsets, perm = ops.moe_dispatch(indices, self.num_experts)
        experts = self.expert_modules()
        weights = [e.weights() for e in experts]
        if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(t.requires_grad for t in weights[0]):
            usage = self.usage if self.usage is not None else ExpertUsage()
            n = len(ops.ExpertWeights._fields)
            flat = _NoGradForUnusedExperts.apply(usage, usage.record(counts), n, *[t for w in weights for t in w])
            weights = [ops.ExpertWeights(*flat[i:i + n]) for i in range(0, len(flat), n)]
        rows = ops.moe_experts(x, shared, perm, offsets, self.top_k, weights,
                               [e.patch_size for e in experts], [e.depth for e in experts])
        return rows, perm

    @annotate("MoCE")
    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        gates, indices, _, loss = self.route(x, freq_emb)
        self.loss = loss
        rows, perm = self.run_experts(x, shared, indices)
        return self.proj_out(ops.moe_combine(rows, gates, perm))

    def all_expert_outputs(self, x: torch.Tensor, shared: torch.Tensor) -> List[torch.Tensor]:
        """Every expert's output on (x, shared), routed or not (for inspection and tests)."""
        B, E = x.shape[0], self.num_experts
        outs = []
        for e in range(E):
            idx = torch.full((B, 1), e, dtype=torch.int64, device=x.device)
            _, offsets, perm = ops.moe_dispatch(idx, E)
            mods = self.expert_modules()
            outs.append(ops.moe_experts(x, shared, perm, offsets, 1, self.expert_weights(),
                                        [m.patch_size for m in mods], [m.depth for m in mods]))
        return outs
