"""Allocation of kernel outputs, poisonable for tests.

Every backend allocates the tensors its kernels write with :func:`new_output`. Inside
:func:`poison_outputs` they start filled with NaN (integers with -1), so that an element a kernel
fails to write shows up in the comparison against the reference; outside, it is ``torch.empty``.
This module sits below the backends and imports nothing from the package.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

_POISON = False


@contextlib.contextmanager
def poison_outputs(on: bool = True) -> Iterator[None]:
    """Inside the block, outputs allocated with :func:`new_output` start poisoned (NaN, or -1)."""
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
