"""Vector-Jacobian products for the reference backward implementations.

Op implementations run below PyTorch's autograd dispatch key, where ``torch.autograd.grad``
sees no graph; ``torch.func.vjp`` works there, so the reference backward of every op is the exact
VJP of its reference forward.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import torch


def vjp(fn: Callable[..., Any], cotangent: Any, *primals: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Gradients of ``<fn(*primals), cotangent>`` with respect to each primal (zeros where unused)."""
    _, pullback = torch.func.vjp(fn, *primals)
    return pullback(cotangent)
