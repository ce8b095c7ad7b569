"""Export a MoCE-IR model to ONNX: :func:`export_onnx`.

The model is traced by the TorchScript exporter ``torch.onnx.export(dynamo=False)`` with dynamic
batch, height and width axes (tracing records the shape arithmetic on ``x.shape`` as graph ops;
``torch.export``'s symbolic-shape reasoning took minutes per model) inside :func:`lowered_ops`, a context in
which every ``moce_kernels.ops`` entry the model calls runs its lowering
(:data:`moce_kernels.onnx.lowerings.LOWERINGS`) and the model's reflect padding to a multiple of 8 is
the gather form of :func:`reflect_pad_to_multiple` (the same values, with symbolic sizes). The graph
holds standard ONNX operators only (checked after the export), its input ``image`` (B, 3, H, W) and
output ``restored`` (B, 3, H, W) with B, H, W dynamic; routing (each MoCE layer's top-k per image)
is computed inside it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from typing import Iterator, Optional, Union

import torch

from .. import ops as _ops
from ..model import moce_ir as _moce_ir
from ..model.moce_ir import MoCEIR
from ..model.moe import ROUTE_OVERRIDES
from .lowerings import LOWERINGS

DEFAULT_OPSET = 18
EXPORT_DTYPES = (torch.float32, torch.float16)
STANDARD_DOMAINS = ("", "ai.onnx")
METADATA_KEY = "moce_config"  # the model's constructor arguments and pad_multiple, JSON


class ExportError(ValueError):
    """A model or an argument that :func:`export_onnx` cannot export, with the reason."""


def reflect_pad_to_multiple(x: torch.Tensor, mult: int) -> torch.Tensor:
    """Pad the bottom/right of x (B, C, H, W) to multiples of ``mult`` as the model does (reflect,
    repeated for sides shorter than the pad; a side of 1 replicates), by one gather per axis.

    Repeated reflection is the triangle wave of period ``2 (n - 1)``: index i of the padded axis reads
    ``m = i mod P`` if ``m < n`` else ``P - m``, with ``P = max(2 (n - 1), 1)``."""
    for dim in (-1, -2):
        n = x.shape[dim]
        padded = (n + mult - 1) // mult * mult
        size = torch.ones(n, dtype=torch.int64, device=x.device).sum()  # n as a graph value, not a constant
        period = (2 * size - 2).clamp(min=1)
        m = torch.arange(padded, device=x.device) % period
        x = x.index_select(dim, torch.where(m < size, m, period - m))
    return x


@contextlib.contextmanager
def lowered_ops() -> Iterator[None]:
    """Within the block, every ``moce_kernels.ops.<name>`` listed in LOWERINGS is its lowering and the
    model pads by :func:`reflect_pad_to_multiple` (the model reaches both through module attributes);
    restored on exit. Not thread-safe: for tracing only."""
    saved = {name: getattr(_ops, name) for name in LOWERINGS}
    saved_pad = _moce_ir._pad_reflect
    try:
        for name, fn in LOWERINGS.items():
            setattr(_ops, name, fn)
        _moce_ir._pad_reflect = reflect_pad_to_multiple
        yield
    finally:
        for name, fn in saved.items():
            setattr(_ops, name, fn)
        _moce_ir._pad_reflect = saved_pad


def check_exportable(model: torch.nn.Module, dtype: torch.dtype, opset: int) -> None:
    """Raise :class:`ExportError` naming what cannot be exported."""
    if not isinstance(model, MoCEIR):
        raise ExportError(f"export_onnx exports a moce_kernels MoCEIR model, got {type(model).__name__}")
    if model.training:
        raise ExportError("the model is in training mode (router noise, auxiliary loss); call model.eval() "
                          "before exporting")
    if model.routing_noise == "always":
        raise ExportError("routing_noise='always' samples router noise in eval, which an ONNX graph would "
                          "make random per run; set model.routing_noise = 'train' (or 'never') to export")
    fixed = [a for a in model.adapters() if a in ROUTE_OVERRIDES.active]
    if fixed:
        raise ExportError("the model is inside a record_routes()/fixed_routes() block; export it outside, "
                          "where each MoCE layer routes with its own router")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < DEFAULT_OPSET:
        raise ExportError(f"opset must be an integer >= {DEFAULT_OPSET} (the lowest tested), "
                          f"got {opset!r}")


def _check_standard(onnx_model) -> None:
    """Every node of the graph (and of its functions) is a standard ONNX operator."""
    foreign = {f"{n.domain}::{n.op_type}" for n in onnx_model.graph.node if n.domain not in STANDARD_DOMAINS}
    if foreign or len(onnx_model.functions):
        raise ExportError(f"the exported graph holds non-standard operators {sorted(foreign)} or "
                          f"{len(onnx_model.functions)} local functions")


def export_onnx(model: MoCEIR, path: Union[str, os.PathLike], *, dtype: torch.dtype = torch.float32,
                opset: int = DEFAULT_OPSET, sample_size: tuple = (2, 37, 45),
                verbose: bool = False) -> "onnx.ModelProto":  # noqa: F821
    """Write ``model`` (an eval-mode :class:`MoCEIR`) to the ONNX file ``path``.

    Args:
        model: left unchanged (a CPU copy in ``dtype`` is traced).
        path: the ``.onnx`` file, weights inside (models below 2 GB).
        dtype: torch.float32 or torch.float16: the graph's input, output and weights. The float16
            graph computes attention, LayerNorm of the window attention, routing and the gated
            combine in float32, as the model does.
        opset: ONNX opset, >= 18.
        sample_size: (B, H, W) of the tracing input; the graph takes any B, H, W >= 1.
    Returns:
        The ``onnx.ModelProto`` written. Input ``image`` (B, 3, H, W), output ``restored``; metadata
        ``moce_config``: the model's configuration (JSON) with its ``pad_multiple``.
    Raises:
        ExportError: a model in training mode, router noise in eval, fixed routes in force, another
            dtype or opset; ImportError when onnx or onnxscript is missing (``pip install
            moce_kernels[onnx]``).
    """
    check_exportable(model, dtype, opset)
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"export_onnx needs onnx and onnxscript ({e}); pip install 'moce_kernels[onnx]'") from e
    net = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()
    B, H, W = sample_size
    image = torch.rand(B, net.inp_channels, H, W, dtype=dtype)
    axes = {0: "batch", 2: "height", 3: "width"}
    with lowered_ops(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore" if not verbose else "default")
        torch.onnx.export(net, (image,), os.fspath(path), dynamo=False, input_names=["image"],
                          output_names=["restored"], opset_version=opset, verbose=verbose,
                          dynamic_axes={"image": axes, "restored": axes})
    onnx_model = onnx.load(os.fspath(path))
    _check_standard(onnx_model)
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(dict(model.config, pad_multiple=model.pad_multiple))
    onnx.save(onnx_model, os.fspath(path))
    return onnx_model
