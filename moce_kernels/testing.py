"""Helpers for tests: poisoned outputs (:mod:`moce_kernels.outputs`) and the error rule of DESIGN.md."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

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


def check_against_reference(run: Callable, backend: str, args: Sequence, args64: Sequence,
                            grad64: Optional[torch.Tensor], dtype: torch.dtype, names: Sequence[str], atol: float,
                            grad_atol: float) -> None:
    """An op's output and gradients under ``backend`` against the reference, by the error rule.

    ``run(backend, args, grad)`` returns (output, gradients; [] without grad). The backend runs on
    ``args`` (in ``dtype``) and the float64 reference on ``args64``, with ``grad64`` (None: forward
    only); the reference on ``args`` gives the error allowance. Gradients whose float64 reference is
    None are skipped. Each atol is scaled by its float64 reference's largest magnitude (at least 1): a
    low-precision result is rounded once more than the float64 reference, which costs up to one ulp
    of its largest values."""
    grad = None if grad64 is None else grad64.to(dtype)
    ref64, g64 = run("reference", args64, grad64)
    refd, gd = run("reference", args, grad)
    out, go = run(backend, args, grad)
    assert out.dtype == dtype, f"{backend}: output dtype {out.dtype}, expected {dtype}"
    assert_within_rule(out, ref64, refd, atol * max(1.0, ref64.abs().max().item()), name=f"{backend} forward")
    for n, a, b, c in zip(names, go, g64, gd):
        if b is not None:
            assert_within_rule(a, b, c, grad_atol * max(1.0, b.abs().max().item()), name=f"{backend} {n}")
