"""moce_kernels: fast, exact MoCE-IR (CVPR 2025) with fused Triton and CUDA C++ kernels."""
from . import nvtx, ops
from .backends import available_backends, backend, get_backend, set_backend
from .model import MoCEIR
from .onnx import export_onnx
from .optimize import optimize
from .restoration import restore

__version__ = "0.1.0"
__all__ = ["MoCEIR", "export_onnx", "optimize", "restore", "ops", "nvtx", "available_backends", "backend", "get_backend",
           "set_backend"]
