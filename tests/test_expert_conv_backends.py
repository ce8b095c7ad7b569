"""Every backend of the fused pointwise -> depthwise convolutions (plain and GELU-gated), forward and
backward, against the float64 reference under the error rule of DESIGN.md (outputs poisoned)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
import torch

import moce_kernels
from moce_kernels import ops
from moce_kernels.testing import check_against_reference, poison_outputs

BACKENDS = moce_kernels.available_backends()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}

# (B, C_in, C_out, H, W, k, pw_bias, dw_bias): odd sizes, channels not multiples of 8
CASES = [
    (2, 5, 10, 19, 23, 3, True, True),
    (1, 3, 6, 1, 7, 7, False, False),
    (3, 9, 14, 6, 5, 7, True, False),
    (2, 4, 6, 5, 9, 5, False, True),
]
GPU_CASES = [
    (2, 48, 144, 67, 131, 3, True, True),
    (1, 96, 192, 128, 128, 7, False, True),
    (3, 33, 70, 41, 29, 5, True, True),
    (8, 12, 24, 64, 64, 7, False, True),
]


def _inputs(case, dtype, device=DEV, scale: float = 0.5):
    B, ci, co, H, W, k, hpb, hdb = case
    g = lambda *s: (torch.randn(*s, dtype=torch.float64) * scale).to(dtype).to(device)  # noqa: E731
    return (g(B, ci, H, W) * 2, g(co, ci, 1, 1), g(co, 1, k, k), g(co) if hpb else None, g(co) if hdb else None)


def _fn(gated: bool):
    return ops.pointwise_depthwise_conv_gated if gated else ops.pointwise_depthwise_conv


def _run(backend: str, gated: bool, args, grad: Optional[torch.Tensor] = None
         ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    leaves = [None if a is None else a.detach().clone().requires_grad_(grad is not None) for a in args]
    with moce_kernels.backend(backend), poison_outputs():
        with torch.set_grad_enabled(grad is not None):
            out = _fn(gated)(*leaves)
            if grad is None:
                return out.detach(), []
            present = [a for a in leaves if a is not None]
            gs = torch.autograd.grad(out, present, grad)
    it = iter(gs)
    return out.detach(), [None if a is None else next(it) for a in leaves]


def _check(backend: str, case, dtype, gated: bool, backward: bool, device=DEV):
    if gated and case[2] % 2:
        pytest.skip("gated needs an even C_out")
    args = _inputs(case, dtype, device)
    args64 = [None if a is None else a.double() for a in args]
    B, _, co, H, W = case[:5]
    grad = (torch.randn(B, co // 2 if gated else co, H, W, dtype=torch.float64, device=device)
            if backward else None)
    names = ["grad_x", "grad_pw_weight", "grad_dw_weight", "grad_pw_bias", "grad_dw_bias"]
    check_against_reference(lambda b, a, g: _run(b, gated, a, g), backend, args, args64, grad, dtype, names,
                            ATOL[dtype], ATOL[dtype] * (10 if dtype in (torch.bfloat16, torch.float16) else 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_forward_backward_fp32(backend, gated, case):
    _check(backend, case, torch.float32, gated, backward=True)


# W and C_in multiples of 8: the CUDA 16-bit forward stages x and the weights by 16-byte cp.async here
# (the cases above take its element-wise path); two column tiles, the second past the image's edge,
# and a last K step with half its channels. Its K loop runs steps in pairs plus an odd count's last
# step: 2 steps (one pair), 1 (the last step alone), 3 (a pair and a half-empty last step), 4 (two
# pairs).
ALIGNED_CASES = [(2, 24, 32, 9, 40, 3, True, True), (1, 16, 12, 10, 24, 7, True, False),
                 (1, 40, 16, 9, 40, 3, True, True), (1, 64, 16, 8, 24, 5, False, True)]


def _check_forwards(backend: str, cases, dtype) -> None:
    """The forward of each case: the first gated, the others plain."""
    for i, case in enumerate(cases):
        _check(backend, case, dtype, gated=i == 0, backward=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_aligned_rows(backend, dtype):
    _check_forwards(backend, ALIGNED_CASES, dtype)


# W even but not a multiple of 8 (the levels below the first of an image padded to a multiple of 8),
# C_in a multiple of 8: the CUDA 16-bit forward stages x by 8-byte (W % 8 == 4) or 4-byte (W % 4 == 2)
# cp.async of 4- or 2-pixel chunks; 1, 2 and 3 K steps, C_in = 8 (rows past C_in zero-filled), two
# column tiles, every k.
NARROW_CASES = [(2, 24, 32, 9, 36, 3, True, True), (1, 16, 16, 10, 42, 7, True, False),
                (1, 40, 16, 9, 20, 5, False, True), (1, 8, 12, 8, 26, 3, True, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_narrow_rows(backend, dtype):
    _check_forwards(backend, NARROW_CASES, dtype)


# Tiles whose halo lies inside the image (the CUDA kernels skip its zero padding there) beside edge
# tiles, with a pw bias (which the padding must remove outside the image): 20 x 72 has interior
# 8 x 32 tiles at k = 3 and 7; W % 8 == 0, so 16-bit inputs take the cp.async path.
INTERIOR_CASES = [(1, 16, 24, 20, 72, 7, True, True), (2, 8, 16, 19, 72, 3, True, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", INTERIOR_CASES)
def test_interior_tiles(backend, dtype, case):
    _check(backend, case, dtype, gated=False, backward=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_float64(backend, gated):
    if backend == "cuda":
        pytest.skip("the cuda backend takes float32/16-bit inputs")
    _check(backend, CASES[2], torch.float64, gated, backward=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_forward_backward(backend, dtype):
    _check(backend, CASES[0], dtype, gated=True, backward=True)
    _check(backend, CASES[1], dtype, gated=False, backward=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_shapes(backend, dtype, gated, case):
    _check(backend, case, dtype, gated, backward=True, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
def test_opcheck(backend, gated):
    args = _inputs((2, 3, 6, 5, 4, 3, True, True), torch.float32)
    op = torch.ops.moce.pointwise_depthwise_conv_gated if gated else torch.ops.moce.pointwise_depthwise_conv
    args = [a.requires_grad_(True) for a in args]
    with moce_kernels.backend(backend):
        torch.library.opcheck(op.default, tuple(args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    x, pw, dw, pb, db = _inputs((1, 4, 6, 5, 5, 3, True, True), torch.float32)
    with moce_kernels.backend(backend):
        with pytest.raises(ValueError, match="pw_weight"):
            ops.pointwise_depthwise_conv(x, pw[:, :3], dw, pb, db)
        with pytest.raises(ValueError, match="dw_weight"):
            ops.pointwise_depthwise_conv(x, pw, torch.randn(6, 1, 4, 4, device=DEV), pb, db)
        with pytest.raises(ValueError, match="dw_bias"):
            ops.pointwise_depthwise_conv(x, pw, dw, pb, db[:5])
        with pytest.raises(ValueError, match="even"):
            ops.pointwise_depthwise_conv_gated(x, pw[:5], dw[:5], pb[:5], db[:5])
        with pytest.raises(ValueError, match="dtype"):
            ops.pointwise_depthwise_conv(x.double(), pw, dw, pb, db)
        with pytest.raises(ValueError, match="empty"):
            ops.pointwise_depthwise_conv(x[:0], pw, dw, pb, db)
