"""The weights of one complexity expert: one named tuple, the contract of every layer.

The model builds an :class:`ExpertWeights` per expert, the op checks their shapes against
:meth:`ExpertWeights.shapes`, the reference and the driver read them by name, and the tests build
them. Only the ``torch.library`` boundary of ``moe_experts`` sees them as one flat list of tensors
(:func:`flatten` / :func:`unflatten`, ``len(ExpertWeights._fields)`` tensors per expert).
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


class ExpertWeights(NamedTuple):
    """Expert of rank r over C channels (depthwise kernels kq x kq for q, kkv x kkv for k and v).

    One step: ``z = proj0(x)``; ``q = q_dw(q(z)) + q_dw_bias``; ``k, v = split(kv_dw(kv(z)) + kv_dw_bias)``;
    ``a = LN(circconv_p(q, k); norm_weight, norm_bias) * v``;
    ``out = x + proj2((proj_out(a) + proj_out_bias) * silu(proj1(shared)))``.
    """
    proj0: torch.Tensor          # (r, C, 1, 1)   1x1 C -> r of the input
    proj1: torch.Tensor          # (r, C, 1, 1)   1x1 C -> r of the shared tensor (the gate)
    proj2: torch.Tensor          # (C, r, 1, 1)   1x1 r -> C of the gated body
    q: torch.Tensor              # (r, r, 1, 1)   1x1 of q
    q_dw: torch.Tensor           # (r, 1, kq, kq) depthwise of q
    q_dw_bias: torch.Tensor      # (r,)
    kv: torch.Tensor             # (2r, r, 1, 1)  1x1 of k and v
    kv_dw: torch.Tensor          # (2r, 1, kkv, kkv) depthwise of k and v
    kv_dw_bias: torch.Tensor     # (2r,)
    norm_weight: torch.Tensor    # (r,)           LayerNorm over channels
    norm_bias: torch.Tensor      # (r,)
    proj_out: torch.Tensor       # (r, r, 1, 1)   1x1 after the window attention
    proj_out_bias: torch.Tensor  # (r,)

    @property
    def rank(self) -> int:
        return int(self.proj0.shape[0])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ExpertWeights":
        """``fn`` applied to every field."""
        return ExpertWeights(*(fn(t) for t in self))

    @staticmethod
    def shapes(C: int, r: int, kq: int, kkv: int) -> "ExpertWeights":
        """The shape of every field (an ExpertWeights of shapes) for rank r over C channels."""
        return ExpertWeights((r, C, 1, 1), (r, C, 1, 1), (C, r, 1, 1), (r, r, 1, 1), (r, 1, kq, kq), (r,),
                             (2 * r, r, 1, 1), (2 * r, 1, kkv, kkv), (2 * r,), (r,), (r,), (r, r, 1, 1), (r,))


PER_EXPERT = len(ExpertWeights._fields)


def flatten(experts: Sequence[ExpertWeights]) -> List[torch.Tensor]:
    """The flat list of tensors the ``moe_experts`` custom op takes (expert-major, field order)."""
    return [t for w in experts for t in w]


def unflatten(flat: Sequence[torch.Tensor]) -> List[ExpertWeights]:
    """Inverse of :func:`flatten`."""
    if len(flat) % PER_EXPERT:
        raise ValueError(f"{len(flat)} tensors do not split into experts of {PER_EXPERT} weights")
    return [ExpertWeights(*flat[i:i + PER_EXPERT]) for i in range(0, len(flat), PER_EXPERT)]
