"""What a backend supplies to run the expert stage: the typed launchers of its kernels.

The driver (:mod:`.driver`) owns the orchestration: buffer layout, packed weights, meta tables and
launch order. A backend (``moce_kernels/triton/expert_stage.py``, ``moce_kernels/cuda/expert_stage.py``)
subclasses :class:`ExpertStageKernels` and implements every launcher; the driver calls nothing else
of it. Launchers write into the tensors they are given and return nothing (but the attention
backward's two small reductions); none reads device data on the host, so a forward can be captured
in a CUDA graph. ``meta`` arguments are int64 ``(E, META_ROW_WIDTH)`` device tables laid out as the
named table of :mod:`.layouts`; ``offsets`` (E+1,) int64 gives the rows ``offsets[e] <= n <
offsets[e+1]`` of expert e; with ``perm`` (and ``kslots`` = k) a row n reads image ``perm[n] // k``
of the source instead of row n.
"""
from __future__ import annotations

import abc
from typing import Optional, Tuple

import torch

from .layouts import PwDwMode

Tensor = torch.Tensor


class ExpertStageKernels(abc.ABC):
    """The launchers of one backend (see the module docstring for the shared arguments)."""

    @abc.abstractmethod
    def pwdw(self, src: Tensor, w: Tensor, dw: Tensor, pb: Optional[Tensor], db: Optional[Tensor], out: Tensor,
             offsets: Tensor, meta: Tensor, N: int, H: int, W: int, K: int, max_nch: int,
             mode: PwDwMode = PwDwMode.PLAIN, perm: Optional[Tensor] = None, kslots: int = 1,
             g: Optional[Tensor] = None, gofull: Optional[Tensor] = None) -> None:
        """Grouped fused 1x1 -> depthwise K x K over N rows of (C, H, W) images (table ``PwDwCol``).

        ``max_nch``: the most output channels written per row (C_OUT, or C_OUT/2 in the gated modes).
        ``PwDwMode.GATED_BACKWARD`` reads the incoming gradient ``g`` (laid out as ``out``) and writes
        ``gofull`` (N, C_OUT, H, W)."""

    @abc.abstractmethod
    def pwdw_backward(self, src: Tensor, w: Tensor, dw: Tensor, pb: Optional[Tensor], go: Tensor, gy: Tensor,
                      gdw: Tensor, gdb: Optional[Tensor], offsets: Tensor, meta: Tensor, N: int, H: int, W: int,
                      K: int, max_cout: int, perm: Optional[Tensor] = None, kslots: int = 1) -> None:
        """Backward core of :meth:`pwdw`: from ``go`` = dL/d(depthwise output), write ``gy`` = dL/d(1x1
        output) and accumulate the depthwise weight and bias gradients into ``gdw``, ``gdb``."""

    @abc.abstractmethod
    def gemm(self, x: Tensor, w: Tensor, b: Optional[Tensor], y: Tensor, offsets: Tensor, meta: Tensor, N: int,
             HW: int, max_cout: int, perm: Optional[Tensor] = None, kslots: int = 1,
             accumulate: bool = False) -> None:
        """Grouped 1x1 (table ``GemmCol``); with ``accumulate``, adds to ``y``."""

    @abc.abstractmethod
    def wgrad(self, g: Tensor, x: Tensor, o: Tensor, bo: Optional[Tensor], offsets: Tensor, meta: Tensor, HW: int,
              max_cout: int, max_cin: int, N: int, perm: Optional[Tensor] = None, kslots: int = 1) -> None:
        """Grouped weight (and bias) gradient accumulated into the float32/64 buffers ``o`` (``bo``)
        (table ``WgradCol``)."""

    @abc.abstractmethod
    def epilogue(self, xs: Tensor, shared: Tensor, attn: Tensor, w: Tensor, out: Tensor, offsets: Tensor,
                 meta: Tensor, perm: Tensor, kslots: int, N: int, C: int, HW: int, x_gather: bool,
                 max_r: int) -> None:
        """``out[n] = xs[row] + proj2((proj_out(attn) + b) * silu(proj1(shared[image])))`` (table
        ``EpilogueCol``); ``row`` = the image of slot ``perm[n]`` when ``x_gather``, else n; ``max_r``
        the largest rank."""

    @abc.abstractmethod
    def epilogue_backward(self, g: Tensor, shared: Tensor, attn: Tensor, w: Tensor, gt: Tensor, gu: Tensor,
                          h: Tensor, offsets: Tensor, meta: Tensor, perm: Tensor, kslots: int, N: int, C: int,
                          HW: int, max_r: int) -> None:
        """From ``g`` = dL/d out, write per expert rank block (laid out like ``attn``) ``gt`` = dL/dt,
        ``gu`` = dL/du and ``h = t * silu(u)``, with t = proj_out(attn) + b and u = proj1(shared)."""

    @abc.abstractmethod
    def gather_sum(self, src: Tensor, inv: Tensor, out: Tensor, kslots: int) -> None:
        """``out[b] = sum_j src[inv[b * k + j]]`` in slot order (deterministic)."""

    @abc.abstractmethod
    def attention_rows(self, q: Tensor, k: Tensor, v: Tensor, window_size: int, norm_weight: Tensor,
                       norm_bias: Tensor, eps: float, out: Tensor, rows: Tensor) -> None:
        """Window FFT attention of rows ``rows[0] <= n < rows[1]`` (an int64 (2,) device tensor) of
        (N, r, H, W) q, k, v into ``out``; other rows untouched."""

    @abc.abstractmethod
    def attention_rows_backward(self, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, window_size: int,
                                norm_weight: Tensor, norm_bias: Tensor, eps: float, grad_q: Tensor,
                                grad_k: Tensor, grad_v: Tensor, rows: Tensor) -> Tuple[Tensor, Tensor]:
        """Backward of :meth:`attention_rows` on the same rows: writes those rows of grad_q/k/v, returns
        (grad_norm_weight, grad_norm_bias) summed over those rows."""
