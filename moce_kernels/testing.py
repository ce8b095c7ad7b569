"""Helpers for testing kernels: poisoned output allocation and the error rule of DESIGN.md."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

_POISON = False


@contextlib.contextmanager
def poison_outputs(on: bool = True) -> Iterator[None]:
    """Inside the block, kernel outputs allocated with :func:`new_output` start filled with NaN
    (integers with -1), so that elements a kernel fails to write show up."""
    global _POISON
    prev, _POISON = _POISON, on
    try:
        yield
    finally:
        _POISON = prev


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output: ``torch.empty``, or poisoned while :func:`poison_outputs` is on."""
    if not _POISON:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(tuple(shape), fill, dtype=dtype, device=device)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_rule(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor, atol: float,
                       name: str = "output", factor: float = 2.0) -> None:
    """flash-attention's rule: ``max|out - ref64| <= factor * max|ref_same_dtype - ref64| + atol``,
    where ``ref64`` is the reference in float64 and ``ref_same_dtype`` the reference run in out's dtype.
    NaN anywhere fails."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten or invalid elements)"
    err = max_err(out, ref64)
    bound = factor * max_err(ref_same_dtype, ref64) + atol
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (reference's own error x{factor} + {atol})"
