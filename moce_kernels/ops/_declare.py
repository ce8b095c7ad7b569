"""The one way an op is declared: :func:`declare`, and its table of declarations.

An :class:`OpDeclaration` holds everything about one op of namespace ``moce`` (cf. NATTEN's
``configs/checks.py``, Liger-Kernel's one module per op): its schema, fake (meta) implementation,
input check, op family, autograd formula with its backward op, an optional ``lowering`` (the op in
plain, exportable aten ops, with the op's signature), the order in which ``auto`` tries the backends
on CUDA, and, through :mod:`moce_kernels.backends`, its ordered implementations, each with the dtypes,
devices and inputs it takes. Backends, :mod:`moce_kernels.census`, the tests and the README's op
table enumerate the ops from :func:`declarations`.

The op is registered with the dispatcher directly (``torch.library.Library``), not through
``torch.library.custom_op``, so that a call in eager mode costs a few Python calls:

* ``CompositeExplicitAutograd``: the op's :class:`~moce_kernels.backends.OpDispatch`, which runs the
  memoized implementation for the call's key.
* ``Autograd``: with gradients needed, an autograd node around the formula (:func:`_autograd_kernel`:
  what ``torch.library.register_autograd`` generates, as a single-level ``autograd.Function`` that
  ``torch.func`` accepts); otherwise straight below autograd.
* ``AutocastCPU`` / ``AutocastCUDA``: floating inputs (not float64) cast to autocast's dtype, the
  rule of autocast's lower-precision ops; the public functions apply the same rule before their checks
  (:func:`autocast_entry`).
* the fake implementation (``torch.library.register_fake``), for FakeTensor, ``torch.compile`` and export.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch._functorch.utils import enable_single_level_autograd_function
from torch._library.autograd import Info, supports_tensorlist
from torch._library.utils import fill_defaults, is_tensorlist_like_type
from torch.autograd.function import _SingleLevelFunction

from .. import backends

_LIB = torch.library.Library("moce", "DEF")  # noqa: TOR901 - the package's namespace, defined once
_AFTER_AUTOGRAD = torch._C._after_autograd_keyset
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


@dataclasses.dataclass(frozen=True)
class Backward:
    """An op's autograd formula and its backward op ``moce::{name}_backward``.

    ``schema``: the backward op's schema; ``fake``: its fake implementation. ``setup_context(ctx,
    inputs, output)`` saves what ``formula(ctx, *grads)`` needs; ``formula`` returns one gradient
    per input of the forward (None where there is none) and calls the backward op
    (``declaration(name).backward.op``) for the work. ``run``: the backward op's kernel, when it is not
    its dispatch table itself (see :func:`declare`); ``shape_class``: the backward op's (see :func:`declare`)."""
    schema: str
    fake: Callable
    setup_context: Callable
    formula: Callable
    run: Optional[Callable] = None
    shape_class: Optional[Callable[..., Hashable]] = None


@dataclasses.dataclass(eq=False)
class OpDeclaration:
    """One op of namespace ``moce`` (see the module docstring).

    ``name``: the op's name; ``schema``: ``"(args) -> returns"``; ``family``: its op family in the
    census and the profiles; ``check``: the public function's input check (raises a clear error);
    ``lowering``: the op in plain aten ops (same signature), or None; ``backward``: the declaration of
    the backward op, or None for one without a gradient; ``forward``: for a backward op, the op it
    differentiates; ``op``: the dispatcher's ``OpOverload`` (``torch.ops.moce.{name}.default``);
    ``dispatch``: its implementations and memoized choices.
    """
    name: str
    schema: str
    family: str
    fake: Callable
    dispatch: backends.OpDispatch
    op: torch._ops.OpOverload
    check: Optional[Callable] = None
    lowering: Optional[Callable] = None
    backward: Optional["OpDeclaration"] = None
    forward: Optional["OpDeclaration"] = None

    @property
    def implementations(self) -> List[Tuple[str, Callable, backends.Support]]:
        """``(backend, function, support)`` of every registered implementation, in ``auto``'s CUDA order
        (each backend's module loaded first)."""
        for b in backends.available_backends():
            backends._load(b)
        order = self.dispatch.cuda_order + tuple(b for b in backends.BACKENDS if b not in self.dispatch.cuda_order)
        return [(b, self.dispatch.impls[b], self.dispatch.support[b]) for b in order if b in self.dispatch.impls]

    def explain(self, *args) -> str:
        """Why each implementation can or cannot run ``args`` (:func:`moce_kernels.backends.explain`)."""
        return backends.explain(self.name, *args)


_DECLARATIONS: Dict[str, OpDeclaration] = {}


def declaration(name: str) -> OpDeclaration:
    """The declaration of op ``name`` (a backward op's too, ``{name}_backward``)."""
    try:
        return _DECLARATIONS[name]
    except KeyError:
        raise KeyError(f"no op {name!r}; declared: {', '.join(sorted(_DECLARATIONS))}") from None


def declarations(backward: bool = False) -> Tuple[OpDeclaration, ...]:
    """Every op's declaration in declaration order; with ``backward`` also the backward ops'."""
    return tuple(d for d in _DECLARATIONS.values() if backward or d.forward is None)


def explain(op: str, *args) -> str:
    """Why each implementation of ``op`` can or cannot run ``args``, and which one runs them."""
    return declaration(op).explain(*args)


def _required_tensors(schema: torch._C.FunctionSchema) -> Tuple[int, ...]:
    return tuple(i for i, a in enumerate(schema.arguments) if str(a.type) == "Tensor")


def _define(name: str, schema: str, fake: Callable, cuda_order: Sequence[str],
            shape_class: Optional[Callable[..., Hashable]],
            run: Optional[Callable]) -> Tuple[torch._ops.OpOverload, backends.OpDispatch]:
    _LIB.define(name + schema, tags=(torch.Tag.pt2_compliant_tag,))
    op = getattr(getattr(torch.ops.moce, name), "default")
    table = backends.declare(name, cuda_order, _required_tensors(op._schema), shape_class)
    _LIB.impl(name, table if run is None else run, "CompositeExplicitAutograd")
    torch.library.register_fake(f"moce::{name}", fake, lib=_LIB)
    for device_type, key in _AUTOCAST_KEYS.items():
        _LIB.impl(name, _autocast_kernel(op, device_type, key), key, with_keyset=True)
    return op, table


def _no_second_derivative(op: torch._ops.OpOverload, outputs: List[torch.Tensor]) -> List[torch.Tensor]:
    """A backward op's ``outputs`` where gradients are being recorded (``create_graph=True``, which
    ``torch.func.grad`` always uses): the values as computed, each behind a node that raises if it is
    differentiated, as ``torch.autograd.function.once_differentiable`` does."""
    err = torch._C._functions.DelayedError(
        f"{op._name}: the moce ops have no second derivative (double backward is not supported)".encode(),
        len(outputs))
    aliases = []
    for t in outputs:
        t = t.detach()
        t.requires_grad = True
        aliases.append(t)
    out = err(*aliases)
    return list(out) if isinstance(out, tuple) else [out]


def _no_grad_kernel(op: torch._ops.OpOverload, differentiable: Optional[Callable]) -> Callable:
    """The Autograd kernel: ``differentiable`` (:func:`_autograd_kernel`) when a gradient is needed, else
    the op below autograd. Without ``differentiable`` (a backward op) the result is the same when a
    gradient is recorded, but differentiating it again raises (no double backward)."""

    def kernel(keyset, *args):
        if torch._C.is_grad_enabled() and torch._C._any_requires_grad(*args):
            if differentiable is not None:
                return differentiable(keyset, *args)
            with torch._C._AutoDispatchBelowAutograd():
                return _no_second_derivative(op, op.redispatch(keyset & _AFTER_AUTOGRAD, *args))
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _AFTER_AUTOGRAD, *args)

    return kernel


def _cast(value: Any, device_type: str, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != torch.float64 and value.device.type == device_type:
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        items = [_cast(v, device_type, dtype) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def autocast_args(args: Sequence[Any], device_type: str) -> Tuple[Any, ...]:
    """``args`` with autocast's rule for lower-precision ops applied when autocast is on for
    ``device_type``: floating tensors (not float64) on that device, also inside lists and tuples, cast
    to ``torch.get_autocast_dtype(device_type)``."""
    if not torch.is_autocast_enabled(device_type):
        return tuple(args)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_cast(a, device_type, dtype) for a in args)


def _first_device_type(args: Sequence[Any]) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return "cpu"


def autocast_entry(fn: Callable) -> Callable:
    """Decorator of a public op function: under ``torch.autocast`` its arguments follow autocast's
    rule for lower-precision ops (:func:`autocast_args`, for the device of the first tensor argument)
    before its checks run; otherwise the function is called as it is."""

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        if torch._C._is_any_autocast_enabled():
            device_type = _first_device_type(args)
            args = autocast_args(args, device_type)
            kwargs = dict(zip(kwargs, autocast_args(tuple(kwargs.values()), device_type)))
        return fn(*args, **kwargs)

    return entry


def _autocast_kernel(op: torch._ops.OpOverload, device_type: str, key: str) -> Callable:
    exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(keyset, *args):
        args = autocast_args(args, device_type)
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return op(*args)

    return kernel


def _autograd_kernel(op: torch._ops.OpOverload, info: Info) -> Callable:
    """The op's kernel when a gradient is needed: an autograd node around the op below autograd, whose
    ``setup_context`` and backward are ``info``'s (what ``torch.library.register_autograd`` generates).
    The node is a single-level ``autograd.Function``, as functorch's own transform-local nodes are, so
    that ``torch.func.grad`` differentiates through it too; torch 2.13's generated node, a plain
    ``autograd.Function`` without ``setup_context``, is refused there (pytorch/pytorch#170834). As in
    the generated node, the dispatch key set travels as the last argument and lists of tensors are
    flattened (``supports_tensorlist``)."""

    def forward(ctx, *args):
        keyset, args = args[-1], args[:-1]
        with torch._C._AutoDispatchBelowAutograd():
            result = op.redispatch(keyset & _AFTER_AUTOGRAD, *args)
        inputs, _ = fill_defaults(op._schema, args, {})
        info._setup_context_fn(ctx=ctx, inputs=inputs, output=result)
        return result

    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        try:
            ctx.needs_input_grad = needs[:-1]
            result = info._backward_fn(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*result, None) if isinstance(result, tuple) else (result, None)

    node = type(f"Backward_{op._namespace}_{op._opname}", (_SingleLevelFunction,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    schema = op._schema
    if any(is_tensorlist_like_type(a.type) for a in (*schema.arguments, *schema.returns)):
        node = supports_tensorlist(node)

    def kernel(keyset, *args):
        with enable_single_level_autograd_function():
            return node.apply(*args, keyset)

    return kernel


def _with_backend_choice(backward: Backward) -> Info:
    """The formula run under the backend choice that was in force for the forward: backend blocks are
    per thread, and the autograd engine runs the backward of CUDA tensors on threads of its own."""

    def setup(ctx, inputs, output):
        ctx.backend_choice = backends.get_backend()
        backward.setup_context(ctx, inputs, output)

    def run(ctx, *grads):
        with backends.backend(ctx.backend_choice):
            return backward.formula(ctx, *grads)

    return Info(_backward_fn=run, _setup_context_fn=setup)


def declare(name: str, schema: str, *, family: str, fake: Callable, check: Optional[Callable] = None,
            backward: Optional[Backward] = None, cuda_order: Sequence[str] = backends.DEFAULT_CUDA_ORDER,
            lowering: Optional[Callable] = None, shape_class: Optional[Callable[..., Hashable]] = None,
            run: Optional[Callable] = None) -> OpDeclaration:
    """Declare op ``moce::{name}`` (and ``moce::{name}_backward`` when ``backward`` is given); see
    :class:`OpDeclaration` for the fields. ``shape_class(*args)``: a hashable summary of the inputs that
    decides the implementations' checks (default: the first tensor argument's shape). ``run``: the op's
    kernel when the implementations take its arguments in another form (it calls the dispatch table,
    ``declaration(name).dispatch``); by default the dispatch table is the kernel."""
    op, table = _define(name, schema, fake, cuda_order, shape_class, run)
    decl = OpDeclaration(name=name, schema=schema, family=family, fake=fake, dispatch=table, op=op, check=check,
                         lowering=lowering)
    differentiable = None
    if backward is not None:
        bop, btable = _define(name + "_backward", backward.schema, backward.fake, cuda_order, backward.shape_class,
                              backward.run)
        decl.backward = OpDeclaration(name=name + "_backward", schema=backward.schema, family=family,
                                      fake=backward.fake, dispatch=btable, op=bop, forward=decl)
        _LIB.impl(bop._name.split("::")[1], _no_grad_kernel(bop, None), "Autograd", with_keyset=True)
        _DECLARATIONS[decl.backward.name] = decl.backward
        differentiable = _autograd_kernel(op, _with_backend_choice(backward))
    _LIB.impl(name, _no_grad_kernel(op, differentiable), "Autograd", with_keyset=True)
    _DECLARATIONS[name] = decl
    return decl


def declare_simple(name: str, params: Sequence[Tuple[str, str]], out_shape: Callable[..., Sequence[int]], *,
                   family: str, check: Optional[Callable] = None, passthrough: Optional[str] = None,
                   cuda_order: Sequence[str] = backends.DEFAULT_CUDA_ORDER) -> OpDeclaration:
    """:func:`declare` for an op that returns one tensor and whose backward returns the gradients of its
    tensor inputs.

    ``params``: the op's inputs in order, as ``(schema type, name)`` pairs ("Tensor", "Tensor?", "float",
    "int"); the op returns one tensor of ``out_shape(*inputs)`` in the first input's dtype. The backward
    op takes ``(grad, *inputs)`` (less ``passthrough``) and returns, in input order, the gradient of every
    tensor input that is present (not None). ``passthrough`` names an optional tensor input that the op
    adds to its result (a residual): its gradient is ``grad`` itself, so the backward op neither takes
    nor returns it, and it is not saved. Every other tensor input is saved for the backward; non-tensor
    inputs get no gradient.
    """
    schema = ", ".join(f"{t} {n}" for t, n in params)
    kept = [(t, n) for t, n in params if n != passthrough]  # the backward op's inputs (after grad)
    kept_tensor = [t.startswith("Tensor") for t, _ in kept]
    at = [n for _, n in params].index(passthrough) if passthrough is not None else None

    def fake(*args):
        return args[0].new_empty(tuple(out_shape(*args)))

    def backward_fake(grad, *args):
        return [torch.empty_like(a) for a, t in zip(args, kept_tensor) if t and a is not None]

    def setup(ctx, inputs, output):
        args = [a for i, a in enumerate(inputs) if i != at]
        ctx.save_for_backward(*[a for a, t in zip(args, kept_tensor) if t])
        ctx.scalars = [a for a, t in zip(args, kept_tensor) if not t]
        ctx.passthrough = at is not None and inputs[at] is not None

    def formula(ctx, grad):
        tensors, scalars = iter(ctx.saved_tensors), iter(ctx.scalars)
        args = [next(tensors) if t else next(scalars) for t in kept_tensor]
        grads = iter(decl.backward.op(grad.contiguous(), *args))
        out = [next(grads) if t and a is not None else None for a, t in zip(args, kept_tensor)]
        if at is not None:
            out.insert(at, grad if ctx.passthrough else None)
        return tuple(out)

    backward_schema = f"(Tensor grad, {', '.join(f'{t} {n}' for t, n in kept)}) -> Tensor[]"
    decl = declare(name, f"({schema}) -> Tensor", family=family, fake=fake, check=check, cuda_order=cuda_order,
                   backward=Backward(backward_schema, backward_fake, setup, formula))
    return decl
