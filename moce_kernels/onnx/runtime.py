"""Run an exported MoCE-IR graph in ONNX Runtime or OpenVINO: :class:`OnnxTileRunner`.

The runner is an ``nn.Module`` that maps a batch of tiles (N, 3, h, w) to their restorations with
the graph, so :func:`moce_kernels.restore` (tiling, blending, out-of-memory handling) and
``moce-restore --runtime`` use it as they use the PyTorch model. Routing runs inside the graph, per
forward input: each tile routes on its own (``routing="tile"``), since the graph has no input for
fixed routes.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .export import METADATA_KEY

RUNTIMES = ("onnxruntime", "openvino")
_NUMPY_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


class RuntimeUnavailable(ImportError):
    """The requested runtime's Python package is not installed."""


def graph_info(path: str) -> Tuple[torch.dtype, Dict]:
    """The element type of the graph's input ``image`` (float32 or float16) and the model configuration
    stored by :func:`~moce_kernels.onnx.export_onnx` (``{}`` for a graph from elsewhere)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    elem = model.graph.input[0].type.tensor_type.elem_type
    dtypes = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16}
    if elem not in dtypes:
        raise ValueError(f"{path}: the graph's input has ONNX element type {elem}; float32 or float16 expected")
    meta = {p.key: p.value for p in model.metadata_props}
    return dtypes[elem], json.loads(meta.get(METADATA_KEY, "{}"))


def _onnxruntime_session(path: str, threads: Optional[int]):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RuntimeUnavailable(f"runtime 'onnxruntime' needs the onnxruntime package ({e}); "
                                 f"pip install 'moce_kernels[onnx]'") from e
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"image": x})[0]


def _openvino_model(path: str, threads: Optional[int]):
    try:
        import openvino as ov
    except ImportError as e:
        raise RuntimeUnavailable(f"runtime 'openvino' needs the openvino package ({e}); "
                                 f"pip install 'moce_kernels[onnx]'") from e
    config = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU plugin would otherwise run bf16 where it can
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[compiled.output(0)].copy()


class OnnxTileRunner(nn.Module):
    """An exported graph (``path``, from :func:`moce_kernels.export_onnx`) in ``runtime``.

    ``forward(x)``: x (N, 3, h, w) float tensor on the CPU, any N, h, w -> (N, 3, h, w) in x's dtype,
    computed in the graph's dtype. ``pad_multiple``, ``inp_channels`` and ``config['dim']`` (from the
    graph's metadata; 8, 3 and 32 without it) are what :func:`moce_kernels.restore` reads to size tiles.
    """

    def __init__(self, path: Union[str, os.PathLike], runtime: str = "onnxruntime", *,
                 threads: Optional[int] = None):
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX file not found: {path}")
        self.runtime = runtime
        self.path = path
        self.graph_dtype, config = graph_info(path)
        self._run = (_onnxruntime_session if runtime == "onnxruntime" else _openvino_model)(path, threads)
        self.pad_multiple = int(config.get("pad_multiple", 8))
        self.inp_channels = int(config.get("inp_channels", 3))
        self.config = {"dim": int(config.get("dim", 32))}
        # restore() reads the device and dtype of the first parameter: the CPU, float32 tiles
        self.register_parameter("_device_anchor", nn.Parameter(torch.zeros(1), requires_grad=False))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.inp_channels:
            raise ValueError(f"expected a (N, {self.inp_channels}, h, w) tensor, got {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"the {self.runtime} runner takes CPU tensors, got one on {x.device}")
        feed = x.detach().to(self.graph_dtype).contiguous().numpy()
        return torch.from_numpy(np.asarray(self._run(feed))).to(x.dtype)


def load_runner(src: Union[str, os.PathLike], runtime: str, *, preset: Optional[str] = None,
                threads: Optional[int] = None) -> OnnxTileRunner:
    """A runner for ``src``: an exported ``.onnx`` file as it is, or a checkpoint (anything
    ``MoCEIR.from_checkpoint`` reads, with ``preset``) exported to a temporary fp32 graph first."""
    src = os.fspath(src)
    if src.lower().endswith(".onnx"):
        return OnnxTileRunner(src, runtime, threads=threads)
    from ..model.moce_ir import MoCEIR
    from .export import export_onnx
    model = MoCEIR.from_checkpoint(src, preset=preset).eval()
    with tempfile.TemporaryDirectory(prefix="moce_onnx_") as tmp:
        path = os.path.join(tmp, "model.onnx")
        export_onnx(model, path)
        return OnnxTileRunner(path, runtime, threads=threads)  # the runtimes keep the graph in memory
