"""Op census of a forward: what runs at the dispatcher level, by op family, and the bytes it moves.

``census(model, x)`` runs one forward under a ``TorchDispatchMode`` and records every op that reaches
the dispatcher:

* **ops**: compute ops. Views, aliases and allocations without a fill (``empty``) are left out; each
  call of one of this package's ops (namespace ``moce``) counts once, whatever its implementation runs
  inside (the mode does not see below it). On a GPU each counted op is at least one kernel launch.
* **bytes** (analytic): each op reads every tensor argument once and writes every output once.
* **floor**: the bytes one fused kernel per *call site* would move: a call site is one family inside
  one module instance (the LayerNorm of a block, the channel attention of one MDTA, ...), and its floor
  is the tensors entering it from outside plus the tensors leaving it, each once.

Families: ``layer norm``, ``1x1``, ``depthwise``, ``channel attention``, ``window attention``,
``expert stage``, ``routing``, ``other``, plus one per fused op that spans several (``LN+1x1+depthwise``,
...). The counts are deterministic (a test holds the op budget); the bytes are a model, not a
measurement.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# aten ops that launch no work: allocations without a fill, metadata, host reads of a scalar
_NO_WORK = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "lift_fresh",
                      "_local_scalar_dense", "is_same_size", "_unsafe_view", "resolve_conj", "resolve_neg"})



def op_families() -> Dict[str, str]:
    """This package's ops (namespace moce), backward ops included, and their family, from the op
    declarations (:func:`moce_kernels.ops.declarations`)."""
    from .ops import declarations  # the ops layer sits above the census helpers
    return {d.name: d.family for d in declarations(backward=True)}


# innermost module (class name, or its range name in moce_kernels.nvtx) -> family of the aten ops it runs
# that are not convolutions
MODULE_FAMILIES = {"LayerNorm": "layer norm", "Attention": "channel attention", "MDTA": "channel attention",
                    "CrossAttention": "channel attention", "AdapterLayer": "routing", "MoCE": "routing"}


def _is_view(func: torch._ops.OpOverload) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def conv_family(weight_shape: Sequence[int]) -> str:
    """``depthwise`` for a (C, 1, k, k) weight with k > 1, ``1x1`` for (C_out, C_in, 1, 1), else ``other``."""
    kernel = tuple(weight_shape[2:])
    if kernel == (1, 1):
        return "1x1"
    return "depthwise" if weight_shape[1] == 1 and weight_shape[0] > 1 else "other"


def family_of(op: str, module: Optional[str], weight_shape: Optional[Sequence[int]] = None) -> str:
    """Family of a dispatcher op (``namespace::name``) run inside the module ``module`` (its class or range
    name); ``weight_shape``: a convolution's weight shape."""
    ns, _, name = op.partition("::")
    if ns == "moce":
        return op_families().get(name, "other")
    if name == "convolution" and weight_shape is not None:
        return conv_family(weight_shape)
    return MODULE_FAMILIES.get(module or "", "other")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _key(t: torch.Tensor) -> int:
    """The storage a tensor lives in (views share their base's): who wrote it."""
    return t.untyped_storage().data_ptr()


def _view_key(t: torch.Tensor) -> Tuple[int, int, Tuple[int, ...], Tuple[int, ...]]:
    """Which elements of that storage a tensor is: three channel chunks of one qkv tensor are three inputs."""
    return _key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride())


@dataclass
class FamilyStats:
    ops: int = 0
    bytes: int = 0
    floor: int = 0


@dataclass
class Census:
    """Per-family ops, analytic bytes and fused floor of one forward, plus the count of each op."""
    families: Dict[str, FamilyStats] = field(default_factory=dict)
    ops: collections.Counter = field(default_factory=collections.Counter)

    @property
    def total_ops(self) -> int:
        return sum(f.ops for f in self.families.values())

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.families.values())

    @property
    def total_floor(self) -> int:
        return sum(f.floor for f in self.families.values())

    def table(self) -> str:
        """Markdown table: family, ops, MB moved (analytic), MB of the fused floor."""
        rows = ["| family | ops | MB moved | MB floor |", "|---|---:|---:|---:|"]
        for name, f in sorted(self.families.items(), key=lambda kv: -kv[1].bytes):
            rows.append(f"| {name} | {f.ops} | {f.bytes / 1e6:.1f} | {f.floor / 1e6:.1f} |")
        rows.append(f"| **all** | **{self.total_ops}** | **{self.total_bytes / 1e6:.1f}** | "
                    f"**{self.total_floor / 1e6:.1f}** |")
        return "\n".join(rows)


class _Recorder(TorchDispatchMode):
    """Counts ops and tracks which call site produced each storage (for the floor)."""

    def __init__(self, modules: List[Tuple[str, int]], expand: Mapping[Any, Callable]):
        super().__init__()
        self.modules = modules  # stack of (class name, id) of the modules being run
        self.expand = expand
        self.expanding: List[str] = []  # families of the expanded ops being run
        self.result = Census()
        self.producer: Dict[int, Tuple[str, int]] = {}  # storage -> call site that wrote it
        self.seen_in: Set[Tuple[Tuple[str, int], Tuple]] = set()  # (site, view) already counted as an input
        self.left: Set[Tuple[Tuple[str, int], int]] = set()  # (producing site, storage) counted as an output
        self.sizes: Dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if func in self.expand:  # count what its eager equivalent runs, charged to the op's family
            self.expanding.append(family_of(name, None))
            try:
                with self:
                    return self.expand[func](*args, **kwargs)
            finally:
                self.expanding.pop()
        out = func(*args, **kwargs)
        ns, _, short = name.partition("::")
        if ns == "aten" and (_is_view(func) or short in _NO_WORK):
            return out
        module = self.modules[-1] if self.modules else ("", 0)
        fam = (self.expanding[-1] if self.expanding
               else family_of(name, module[0], args[1].shape if short == "convolution" else None))
        site = (fam, module[1])
        stats = self.result.families.setdefault(fam, FamilyStats())
        stats.ops += 1
        self.result.ops[name] += 1
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        stats.bytes += sum(_nbytes(t) for t in ins + outs)
        for t in ins:
            self._consume(site, t)
        for t in outs:
            self.producer[_key(t)] = site
            self.sizes[_key(t)] = _nbytes(t)
        return out

    def _consume(self, site: Tuple[str, int], t: torch.Tensor) -> None:
        key = _key(t)
        src = self.producer.get(key)
        if src == site:
            return
        if (site, _view_key(t)) not in self.seen_in:  # enters this call site from outside
            self.seen_in.add((site, _view_key(t)))
            self.result.families[site[0]].floor += _nbytes(t)
        if src is not None and (src, key) not in self.left:  # leaves the site that wrote it
            self.left.add((src, key))
            self.result.families[src[0]].floor += self.sizes[key]

    def finish(self, outputs: Any) -> None:
        for t in tree_leaves(outputs):
            if isinstance(t, torch.Tensor):
                src = self.producer.get(_key(t))
                if src is not None and (src, _key(t)) not in self.left:
                    self.left.add((src, _key(t)))
                    self.result.families[src[0]].floor += self.sizes[_key(t)]


@contextlib.contextmanager
def _module_stack(model: nn.Module, stack: List[Tuple[str, int]]) -> Iterator[None]:
    def enter(mod: nn.Module, args: Any) -> None:
        stack.append((type(mod).__name__, id(mod)))

    def leave(mod: nn.Module, args: Any, out: Any) -> None:
        stack.pop()

    handles = []
    for m in model.modules():
        handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def census(model: nn.Module, *inputs: Any, expand: Optional[Mapping[Any, Callable]] = None) -> Census:
    """Run ``model(*inputs)`` once (no gradients) and return its :class:`Census`.

    ``expand``: op overloads -> functions to run in their place (e.g. our ops' eager references), whose
    ops are then counted instead, charged to the replaced op's family and call site: the census of the
    eager path that the fused op replaces."""
    stack: List[Tuple[str, int]] = []
    rec = _Recorder(stack, expand or {})
    with torch.no_grad(), _module_stack(model, stack), rec:
        out = model(*inputs)
    rec.finish(out)
    return rec.result


def __getattr__(name: str):
    """``OP_FAMILIES``: :func:`op_families` (read from the declarations when asked for)."""
    if name == "OP_FAMILIES":
        return op_families()
    raise AttributeError(name)
