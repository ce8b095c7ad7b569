"""Helpers for tests: poisoned outputs (:mod:`moce_kernels.outputs`) and the error rule of DESIGN.md."""
from __future__ import annotations

import torch

from .outputs import poison_outputs  # noqa: F401  (re-exported: the tests take it from here)


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
