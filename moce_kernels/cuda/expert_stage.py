"""Backend ``cuda`` of the MoCE expert stage and of the plain pointwise->depthwise ops (csrc/grouped_conv,
csrc/expert_stage).

:class:`CudaExpertStage` implements the launchers of
:class:`moce_kernels.expert_stage.interface.ExpertStageKernels` as thin wrappers of ``torch.ops.moce_C``
(``grouped_pwdw``, ``grouped_gemm``, ``grouped_wgrad``, ``expert_epilogue``, ``gather_sum``); the window
attention of each expert's rows is the window-attention family's (:mod:`.window_attention`), whose CUDA
kernels take windows up to 32: the window-64 expert of a ``num_experts=5`` model runs the Triton rows
kernel instead (:mod:`moce_kernels.triton.window_attention`), and without Triton that is an error saying
so. Importing this module registers ``pointwise_depthwise_conv(_gated)(_backward)`` and
``moe_experts(_backward)`` as backend ``cuda`` for float32, float16 and bfloat16 (float64 calls run the
reference: :func:`moce_kernels.backends.resolve`).
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch

from . import extension  # noqa: F401  (registers torch.ops.moce_C)

from ..backends import FP32_AND_16BIT, BackendUnavailableError, register_all
from ..expert_stage.implementations import conv_and_expert_implementations
from ..expert_stage.interface import ExpertStageKernels
from ..expert_stage.layouts import PwDwMode
from . import window_attention as wattn

_ops = torch.ops.moce_C
Tensor = torch.Tensor


class CudaExpertStage(ExpertStageKernels):
    """The CUDA launchers (signatures and semantics: :class:`ExpertStageKernels`)."""

    def pwdw(self, src: Tensor, w: Tensor, dw: Tensor, pb: Optional[Tensor], db: Optional[Tensor], out: Tensor,
             offsets: Tensor, meta: Tensor, N: int, H: int, W: int, K: int, max_nch: int,
             mode: PwDwMode = PwDwMode.PLAIN, perm: Optional[Tensor] = None, kslots: int = 1,
             g: Optional[Tensor] = None, gofull: Optional[Tensor] = None) -> None:
        _ops.grouped_pwdw(src, w, dw, pb, db, out, offsets, meta, perm, kslots, N, H, W, K, max_nch, int(mode), g,
                          gofull if gofull is not None else out)

    def pwdw_backward(self, src: Tensor, w: Tensor, dw: Tensor, pb: Optional[Tensor], go: Tensor, gy: Tensor,
                      gdw: Tensor, gdb: Optional[Tensor], offsets: Tensor, meta: Tensor, N: int, H: int, W: int,
                      K: int, max_cout: int, perm: Optional[Tensor] = None, kslots: int = 1) -> None:
        _ops.grouped_pwdw_backward(src, w, dw, pb, go, gy, gdw, gdb if gdb is not None else gdw, gdb is not None,
                                   offsets, meta, perm, kslots, N, H, W, K, max_cout)

    def gemm(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, offsets: Tensor, meta: Tensor, N: int,
             HW: int, max_cout: int, perm: Optional[Tensor] = None, kslots: int = 1,
             accumulate: bool = False) -> None:
        _ops.grouped_gemm(x, w, b, y, offsets, meta, perm, kslots, N, HW, max_cout, accumulate)

    def wgrad(self, g: Tensor, x: Tensor, o: Tensor, bo: Optional[Tensor], offsets: Tensor, meta: Tensor, HW: int,
              max_cout: int, max_cin: int, N: int, perm: Optional[Tensor] = None, kslots: int = 1) -> None:
        n_split = max(1, min(N * ((HW + 31) // 32), 128))
        _ops.grouped_wgrad(g, x, o, bo if bo is not None else o, bo is not None, offsets, meta, perm, kslots, HW,
                           max_cout, max_cin, n_split)

    def epilogue(self, xs: Tensor, shared: Tensor, attn: Tensor, w: Tensor, out: Tensor, offsets: Tensor,
                 meta: Tensor, perm: Tensor, kslots: int, N: int, C: int, HW: int, x_gather: bool,
                 max_r: int) -> None:
        _ops.expert_epilogue(xs, shared, attn, w, out, offsets, meta, perm, kslots, N, C, HW, x_gather, max_r)

    def epilogue_backward(self, g: Tensor, shared: Tensor, attn: Tensor, w: Tensor, gt: Tensor, gu: Tensor,
                          h: Tensor, offsets: Tensor, meta: Tensor, perm: Tensor, kslots: int, N: int, C: int,
                          HW: int, max_r: int) -> None:
        _ops.expert_epilogue_backward(g, shared, attn, w, gt, gu, h, offsets, meta, perm, kslots, N, C, HW, max_r)

    def gather_sum(self, src: Tensor, inv: Tensor, out: Tensor, kslots: int) -> None:
        _ops.gather_sum(src.to(torch.float32).contiguous(), inv, out, kslots)

    def attention_rows(self, q: Tensor, k: Tensor, v: Tensor, window_size: int, *rest) -> None:
        _rows_module(window_size).window_attention_rows(q, k, v, window_size, *rest)

    def attention_rows_backward(self, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, window_size: int,
                                *rest) -> Tuple[Tensor, Tensor]:
        return _rows_module(window_size).window_attention_rows_backward(grad, q, k, v, window_size, *rest)


def _rows_module(window_size: int):
    """The window-attention rows kernels for ``window_size``: CUDA's up to 32, Triton's past it."""
    if window_size in wattn.WINDOW_SIZES:
        return wattn
    try:
        return importlib.import_module("moce_kernels.triton.window_attention")
    except ImportError as e:
        raise BackendUnavailableError(
            f"window_size {window_size}: the cuda backend's window attention takes {wattn.WINDOW_SIZES}, and "
            f"the Triton kernel that takes larger windows is unavailable ({e})") from None


KERNELS = CudaExpertStage()
register_all("cuda", conv_and_expert_implementations(KERNELS), dtypes=FP32_AND_16BIT)
