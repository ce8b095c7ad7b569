"""The LayerNorm-folded convolutions (layer_norm_pointwise_depthwise_conv(_gated), layer_norm_pointwise_conv)
and pointwise_conv (1x1 + bias + residual): every backend, forward and backward, against the float64
reference under the error rule of DESIGN.md (outputs poisoned); the reference against the model's
LayerNorm + pw->dw, float64 gradcheck, opcheck, inputs whose mean dwarfs their spread, clear errors.
 Seeded per test by tests/conftest.py
(the seed is printed with a failure; MOCE_TEST_SEED replays it)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moce_kernels
from moce_kernels import backends, ops
from moce_kernels.model.layers import LayerNorm
from moce_kernels.testing import check_against_reference, poison_outputs

# The cuda backend does not implement these ops (test_cuda_backend_is_a_clear_error).
BACKENDS = [b for b in moce_kernels.available_backends() if b != "cuda"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
OPS = ("layer_norm_pointwise_depthwise_conv", "layer_norm_pointwise_depthwise_conv_gated",
       "layer_norm_pointwise_conv", "pointwise_conv")

# LN -> pw -> dw: (B, C_in, C_out, H, W, k, norm_bias, pw_bias, dw_bias); odd sizes, channels not multiples
# of 8; C_in = 37 takes two K steps of the kernels' 1x1 (the LayerNorm sums run across steps)
PWDW_CASES = [(2, 5, 6, 7, 9, 3, True, True, True), (2, 37, 10, 13, 5, 7, False, False, True),
              (2, 4, 8, 9, 6, 3, True, False, False)]
# LN -> pw: (B, C_in, C_out, H, W, chunks, norm_bias, bias)
PW_CASES = [(2, 5, 12, 7, 9, 2, True, True), (3, 37, 4, 13, 5, 1, False, False), (1, 8, 9, 5, 11, 3, True, False)]


def _g(*shape, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, device=DEV) * scale


def _x(B: int, C: int, H: int, W: int, mean: float = 0.0) -> torch.Tensor:
    """Activations with a per-pixel offset (so the LayerNorm's centring matters) around ``mean``."""
    return _g(B, C, H, W, scale=1.5) + _g(B, 1, H, W, scale=1.0) + mean


def _norm(C: int, bias: bool) -> List[Optional[torch.Tensor]]:
    return [1.0 + _g(C, scale=0.3), _g(C, scale=0.3) if bias else None]


def _pwdw_args(case, mean: float = 0.0) -> list:
    B, ci, co, H, W, k, hnb, hpb, hdb = case
    return ([_x(B, ci, H, W, mean)] + _norm(ci, hnb)
            + [_g(co, ci, 1, 1), _g(co, 1, k, k), _g(co) if hpb else None, _g(co) if hdb else None, 1e-5])


def _pw_args(case, mean: float = 0.0) -> list:
    B, ci, co, H, W, chunks, hnb, hb = case
    return [_x(B, ci, H, W, mean)] + _norm(ci, hnb) + [_g(co, ci, 1, 1), _g(co) if hb else None, 1e-5, chunks]


def _ln_pwdw(gated: bool) -> Callable:
    return ops.layer_norm_pointwise_depthwise_conv_gated if gated else ops.layer_norm_pointwise_depthwise_conv


def _ln_pw(*args) -> torch.Tensor:
    """layer_norm_pointwise_conv with its chunks stacked on a leading axis (one tensor to compare)."""
    out = ops.layer_norm_pointwise_conv(*args)
    return torch.stack(out) if isinstance(out, tuple) else out


def _run(backend: str, fn: Callable, args: Sequence, grad: Optional[torch.Tensor] = None
         ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """fn(*args) under ``backend`` with poisoned outputs; with grad, also the gradients of every tensor arg."""
    leaves = [a.detach().clone().requires_grad_(grad is not None) if isinstance(a, torch.Tensor) else a for a in args]
    with moce_kernels.backend(backend), poison_outputs(), torch.set_grad_enabled(grad is not None):
        out = fn(*leaves)
        if grad is None:
            return out.detach(), []
        gs = iter(torch.autograd.grad(out, [a for a in leaves if isinstance(a, torch.Tensor)], grad))
    return out.detach(), [next(gs) if isinstance(a, torch.Tensor) else None for a in leaves]


def _check(backend: str, fn: Callable, args64: Sequence, dtype: torch.dtype, backward: bool = True) -> None:
    """fn under ``backend`` in ``dtype`` against the float64 reference (output and every gradient)."""
    args = [a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args64]
    grad = torch.randn_like(_run("reference", fn, args64)[0]) if backward else None
    names = [f"grad of argument {i}" for i in range(len(args))]
    check_against_reference(lambda b, a, g: _run(b, fn, a, g), backend, args, args64, grad, dtype, names,
                            ATOL[dtype], ATOL[dtype] * (10 if dtype in (torch.bfloat16, torch.float16) else 1))


# ----------------------------------------------------------------------------- every backend vs float64
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", PWDW_CASES)
def test_layer_norm_pointwise_depthwise_fp32(backend, gated, case):
    _check(backend, _ln_pwdw(gated), _pwdw_args(case), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_pointwise_depthwise_half(backend, dtype):
    _check(backend, _ln_pwdw(True), _pwdw_args(PWDW_CASES[0]), dtype)
    _check(backend, _ln_pwdw(False), _pwdw_args(PWDW_CASES[1]), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PW_CASES)
def test_layer_norm_pointwise_fp32(backend, case):
    _check(backend, _ln_pw, _pw_args(case), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_pointwise_half(backend, dtype):
    _check(backend, _ln_pw, _pw_args(PW_CASES[0]), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pointwise_conv(backend, dtype):
    B, ci, co, H, W = 2, 37, 6, 13, 5
    _check(backend, ops.pointwise_conv, [_x(B, ci, H, W), _g(co, ci, 1, 1), _g(co), _g(B, co, H, W)], dtype)
    if dtype == torch.float32:
        _check(backend, ops.pointwise_conv, [_x(1, 5, 7, 9), _g(3, 5, 1, 1), None, None], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64(backend):
    _check(backend, _ln_pwdw(True), _pwdw_args(PWDW_CASES[2]), torch.float64)
    _check(backend, _ln_pw, _pw_args(PW_CASES[0]), torch.float64)
    _check(backend, ops.pointwise_conv, [_x(2, 5, 7, 9), _g(6, 5, 1, 1), _g(6), _g(2, 6, 7, 9)], torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_bias", [True, False])
def test_large_mean(backend, norm_bias):
    """x = 1e4 + O(1) in fp32, channel 0 an outlier: per-pixel statistics taken as E[x^2] - E[x]^2 in
    fp32 would lose the variance entirely (E[x^2] ~ 1e8 has an ulp of 8); the error rule still holds."""
    pwdw = PWDW_CASES[0][:6] + (norm_bias,) + PWDW_CASES[0][7:]
    args = _pwdw_args(pwdw, mean=1e4)
    args[0][:, 0] += 30.0
    _check(backend, _ln_pwdw(False), args, torch.float32)
    args = _pw_args(PW_CASES[1][:6] + (norm_bias, True), mean=-1e4)
    _check(backend, _ln_pw, args, torch.float32, backward=False)


# ----------------------------------------------------------------------------- the reference itself
def _layer_norm(C: int, layer_norm_type: str) -> LayerNorm:
    ln = LayerNorm(C, layer_norm_type)
    with torch.no_grad():
        for p in ln.parameters():
            p.copy_(p + torch.randn_like(p) * 0.3)
    return ln


@pytest.mark.parametrize("layer_norm_type", ["WithBias", "BiasFree"])
@pytest.mark.parametrize("gated", [False, True])
def test_reference_is_the_model_trunk(layer_norm_type, gated):
    """The reference is the model's LayerNorm followed by pointwise_depthwise_conv(_gated), bit for bit;
    layer_norm_pointwise_conv is the decoder's two projections of the normalised input."""
    B, C, H, W = 2, 6, 7, 9
    ln = _layer_norm(C, layer_norm_type)
    x = _x(B, C, H, W).float()
    pw, dw, pb, db = (t.float() for t in (_g(4 * C, C, 1, 1), _g(4 * C, 1, 3, 3), _g(4 * C), _g(4 * C)))
    nb = getattr(ln.body, "bias", None)
    with torch.no_grad(), moce_kernels.backend("reference"):
        n = ln(x)
        unfused = ops.pointwise_depthwise_conv_gated if gated else ops.pointwise_depthwise_conv
        assert torch.equal(_ln_pwdw(gated)(x, ln.body.weight, nb, pw, dw, pb, db), unfused(n, pw, dw, pb, db))
        proj = [nn.Conv2d(C, C, 1), nn.Conv2d(C, C, 1)]
        assert torch.equal(ops.layer_norm_pointwise_conv(x, ln.body.weight, nb, proj[0].weight, proj[0].bias),
                           proj[0](n))
        both = ops.layer_norm_pointwise_conv(x, ln.body.weight, nb, torch.cat([p.weight for p in proj]),
                                             torch.cat([p.bias for p in proj]), chunks=2)
        for got, p in zip(both, proj):
            assert got.is_contiguous()
            torch.testing.assert_close(got, p(n), rtol=1e-6, atol=1e-6)
        r = torch.randn(B, C, H, W)
        assert torch.equal(ops.pointwise_conv(n, proj[0].weight, proj[0].bias, r), proj[0](n) + r)


def gradcheck(fn: Callable, inputs: tuple) -> bool:
    return torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("norm_bias", [True, False])
def test_gradcheck_reference(norm_bias):
    """The reference's closed-form backward formulas against finite differences (float64; fast mode:
    random projections of the Jacobians)."""
    x, nw, nb = _x(2, 3, 3, 4), *_norm(3, norm_bias)
    pw, dw, pb, db = _g(4, 3, 1, 1), _g(4, 1, 3, 3), _g(4), _g(4)
    r = _g(2, 4, 3, 4)
    leaves = [t.requires_grad_() for t in (x, nw, pw, dw, pb, db, r)]
    x, nw, pw, dw, pb, db, r = leaves
    with moce_kernels.backend("reference"):
        for gated in (False, True):
            assert gradcheck(lambda *a: _ln_pwdw(gated)(a[0], a[1], nb, *a[2:]), (x, nw, pw, dw, pb, db))
        if nb is not None:
            nb.requires_grad_()
            assert gradcheck(lambda x, nb: _ln_pwdw(False)(x, nw, nb, pw, dw), (x, nb))
            assert gradcheck(lambda nb: _ln_pw(x, nw, nb, pw, pb, 1e-5, 2), (nb,))
        assert gradcheck(lambda x, nw, pw, pb: _ln_pw(x, nw, nb, pw, pb, 1e-5, 2), (x, nw, pw, pb))
        assert gradcheck(ops.pointwise_conv, (x, pw, pb, r))


def _opcheck_args(op: str) -> tuple:
    x, nw, nb = _x(2, 3, 5, 4).float(), *(t.float() for t in _norm(3, True))
    pw, dw, b = _g(6, 3, 1, 1).float(), _g(6, 1, 3, 3).float(), _g(6).float()
    if op.startswith("layer_norm_pointwise_depthwise"):
        return x, nw, nb, pw, dw, b, None, 1e-5
    if op == "layer_norm_pointwise_conv":
        return x, nw, None, pw, b, 1e-5, 2
    return x, pw, b, _g(2, 6, 5, 4).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(backend, op):
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in _opcheck_args(op))
    with moce_kernels.backend(backend):
        torch.library.opcheck(getattr(torch.ops.moce, op).default, args)


# ----------------------------------------------------------------------------- errors
def test_errors():
    x, nw, nb, pw, dw, pb, db, _ = _pwdw_args((1, 4, 6, 5, 5, 3, True, True, True))
    x, nw, nb, pw, dw, pb, db = (t.float() for t in (x, nw, nb, pw, dw, pb, db))
    f = ops.layer_norm_pointwise_depthwise_conv
    with pytest.raises(ValueError, match="norm_weight must have 4 entries"):
        f(x, nw[:3], nb, pw, dw, pb, db)
    with pytest.raises(ValueError, match="norm_bias must have 4 entries"):
        f(x, nw, nb[:3], pw, dw, pb, db)
    with pytest.raises(ValueError, match="eps"):
        f(x, nw, nb, pw, dw, pb, db, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        f(x, nw, nb, pw, dw, pb, db, eps=float("nan"))
    with pytest.raises(ValueError, match="norm_weight has dtype torch.float64"):
        f(x, nw.double(), nb, pw, dw, pb, db)
    with pytest.raises(ValueError, match="pw_weight"):
        f(x, nw, nb, pw[:, :3], dw, pb, db)
    with pytest.raises(ValueError, match="even"):
        ops.layer_norm_pointwise_depthwise_conv_gated(x, nw, nb, pw[:5], dw[:5])
    with pytest.raises(ValueError, match="chunks must be a positive integer dividing C_out = 6"):
        ops.layer_norm_pointwise_conv(x, nw, nb, pw, pb, chunks=4)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm_pointwise_conv(x, nw, nb, pw[:, :3], pb)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.pointwise_conv(x, pw, pb, x)
    with pytest.raises(ValueError, match="bias must have 6 entries"):
        ops.pointwise_conv(x, pw, pb[:5])
    with pytest.raises(ValueError, match="empty"):
        ops.pointwise_conv(x[:0], pw)


def test_cuda_backend_leaves_these_ops_to_auto(monkeypatch):
    """No CUDA C++ for these ops: asking the cuda backend for one names the op and the backends that have
    it; under an explicit ``cuda`` choice, as under ``auto``, they run on Triton on a CUDA device (a model
    runs whole under ``cuda``). (Checked on the registry as imported, without building the extension.)"""
    backends._load("triton")
    monkeypatch.setattr(backends, "_load", lambda name: None)
    monkeypatch.setattr(backends, "_why_unavailable", lambda name: None)
    for op in OPS:
        for name in (op, op + "_backward"):
            why = rf"op '{name}' has no 'cuda' implementation \(implemented by: reference, triton\)"
            with pytest.raises(NotImplementedError, match=why):
                backends.implementation(name, "cuda")
            assert backends.resolve(name, torch.device("cuda"), "auto") == "triton"
            assert backends.resolve(name, torch.device("cuda"), "cuda") == "triton"


# the trunk's shapes on a GPU: MDTA's qkv (C -> 3C, k 3), GDFN's input (C -> 4C gated), the decoder's two
# projections (C -> 2C, chunks 2), a projection with its residual; C = 48 and 96, batch 2, 64 x 48
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [48, 96])
def test_gpu_trunk_shapes(backend, dtype, C):
    _check(backend, _ln_pwdw(False), _pwdw_args((2, C, 3 * C, 64, 48, 3, True, True, True)), dtype)
    _check(backend, _ln_pwdw(True), _pwdw_args((2, C, 4 * C, 64, 48, 3, True, True, True)), dtype)
    _check(backend, _ln_pw, _pw_args((2, C, 2 * C, 64, 48, 2, True, True)), dtype)
    x, w, b, r = _g(2, 2 * C, 64, 48), _g(C, 2 * C, 1, 1), _g(C), _g(2, C, 64, 48)
    _check(backend, ops.pointwise_conv, [x, w, b, r], dtype)
