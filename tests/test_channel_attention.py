"""Channel ("transposed") attention with the output 1x1 and the residual (MDTA, CrossAttention): every
backend that implements it against the model's eager formula in float64, under the error rule of
DESIGN.md (outputs poisoned), forward and backward, q/k/v as views of one packed tensor, opcheck,
gradcheck of the reference, errors. Without a GPU, Triton runs in its interpreter. Seeded per test by
tests/conftest.py (the seed is printed with a failure; MOCE_TEST_SEED replays it)."""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import moce_kernels
from moce_kernels import backends
from moce_kernels.ops import channel_attention
from moce_kernels.reference.channel_attention import channel_attention as reference_formula
from moce_kernels.testing import assert_within_rule, poison_outputs

OP = "channel_attention"
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _implements(backend: str) -> bool:
    try:
        backends.implementation(OP, backend)
        return True
    except NotImplementedError:
        return False


BACKENDS = [b for b in moce_kernels.available_backends() if _implements(b)]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
# the rule's "small atol", relative to the largest reference magnitude
REL_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


class Case(NamedTuple):
    B: int
    heads: int
    c: int          # channels per head
    H: int
    W: int
    c_out: int      # 0: C_out = C (the model)
    bias: bool
    residual: bool
    packed: bool    # q, k, v = chunk(3) of one (B, 3C, H, W) tensor


# odd sizes, batch > 1, heads 1..8, c = 8, 12, 20, 6 and the models' 48 (MoCE-IR) and 32 (MoCE-IR-S);
# on the CPU the Triton Gram passes split N = 65 and 143 pixels into several chunks (two-stage reduction)
# and N = 42, 63 into one (see test_split_paths_covered)
CASES = [
    Case(2, 1, 8, 7, 9, 0, True, True, True),
    Case(2, 2, 12, 13, 5, 0, False, True, False),
    Case(1, 4, 20, 13, 11, 0, True, False, True),
    Case(2, 8, 8, 6, 7, 0, True, True, True),
    Case(2, 3, 6, 11, 13, 10, True, True, False),
    Case(1, 2, 48, 9, 7, 0, True, True, True),
    Case(2, 1, 32, 5, 13, 0, False, False, True),
]


class Inputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    temperature: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]


def _inputs(case: Case) -> Inputs:
    """float64 inputs; k correlated with q so that the softmax is far from uniform."""
    B, heads, c, H, W, c_out, bias, res, _ = case
    C = heads * c
    c_out = c_out or C
    g = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEV)  # noqa: E731
    q = g(B, C, H, W)
    k = 0.7 * q + 0.7 * g(B, C, H, W)
    return Inputs(q, k, g(B, C, H, W), 1.0 + 3.0 * torch.rand(heads, 1, 1, dtype=torch.float64, device=DEV),
                  g(c_out, C, 1, 1) / C ** 0.5, g(c_out) if bias else None, g(B, c_out, H, W) if res else None)


def _transposed_attention(q, k, v, heads: int, temperature) -> torch.Tensor:
    """The authors' MDTA core (Restormer's): per head, L2-normalise q, k over H*W, softmax(q k^T * t) v."""
    b, c, h, w = q.shape
    q = F.normalize(q.reshape(b, heads, c // heads, h * w), dim=-1)
    k = F.normalize(k.reshape(b, heads, c // heads, h * w), dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature
    return (attn.softmax(dim=-1) @ v.reshape(b, heads, c // heads, h * w)).reshape(b, c, h, w)


def _eager(q, k, v, temperature, weight, bias, residual) -> torch.Tensor:
    """The authors' computation: transposed attention, project_out, residual add."""
    out = F.conv2d(_transposed_attention(q, k, v, temperature.shape[0], temperature), weight, bias)
    return out if residual is None else out + residual


def _run(fn, inp: Inputs, grad: torch.Tensor, dtype: torch.dtype, packed: bool
         ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """``fn(q, k, v, ...)`` on inputs cast to ``dtype``; returns (out, grads of every input). A backend
    name for ``fn`` runs the op there, forward and backward, with outputs poisoned."""
    if isinstance(fn, str):
        with moce_kernels.backend(fn), poison_outputs():
            return _run(channel_attention, inp, grad, dtype, packed)
    if packed:
        x = torch.cat([inp.q, inp.k, inp.v], 1).to(dtype).requires_grad_(True)
        qkv, leaves = list(x.chunk(3, 1)), [x]
    else:
        qkv = [t.to(dtype).requires_grad_(True) for t in inp[:3]]
        leaves = list(qkv)
    rest = [None if t is None else t.to(dtype).requires_grad_(True) for t in inp[3:]]
    out = fn(*qkv, *rest)
    present = leaves + [t for t in rest if t is not None]
    grads = list(torch.autograd.grad(out, present, grad.to(dtype)))
    g_qkv = list(grads[0].chunk(3, 1)) if packed else grads[:3]
    it = iter(grads[len(leaves):])
    return out.detach(), g_qkv + [None if t is None else next(it) for t in rest]


NAMES = ("q", "k", "v", "temperature", "proj_weight", "proj_bias", "residual")


def _rounded(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """t rounded to dtype, held in float64: every run then sees the same input values."""
    return None if t is None else t.to(dtype).to(torch.float64)


def _check(backend: str, case: Case, dtype: torch.dtype) -> None:
    inp = Inputs(*(_rounded(t, dtype) for t in _inputs(case)))
    grad = _rounded(torch.randn_like(inp.residual if inp.residual is not None else _eager(*inp)), dtype)
    o64, g64 = _run(_eager, inp, grad, torch.float64, case.packed)
    o_lp, g_lp = _run(_eager, inp, grad, dtype, case.packed)
    out, grads = _run(backend, inp, grad, dtype, case.packed)
    assert out.dtype == dtype and out.is_contiguous()
    rel = REL_ATOL[dtype]
    assert_within_rule(out, o64, o_lp, rel * max(1.0, o64.abs().max().item()), name=f"{backend} out")
    for name, got, r64, rlp in zip(NAMES, grads, g64, g_lp):
        if r64 is None:
            assert got is None
            continue
        assert got.dtype == dtype and got.shape == r64.shape
        assert_within_rule(got, r64, rlp, rel * max(1.0, r64.abs().max().item()), name=f"{backend} grad_{name}")


# ----------------------------------------------------------------------------------------------
# forward + backward against the float64 eager formula
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32(backend, case):
    _check(backend, case, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=str)
def test_low_precision(backend, dtype, case):
    _check(backend, case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64(backend):
    _check(backend, CASES[4], torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamped_rows(backend):
    """Rows of q and k with norm below eps (one exactly zero, one tiny): the clamp's branch, whose
    gradient skips the norm term."""
    case = Case(2, 2, 4, 5, 7, 0, True, True, True)
    inp = _inputs(case)
    inp.q[0, 1].zero_()
    inp.k[1, 6].mul_(1e-14)
    grad = torch.randn_like(inp.residual)
    o64, g64 = _run(_eager, inp, grad, torch.float64, True)
    out, grads = _run(backend, inp, grad, torch.float64, True)
    assert_within_rule(out, o64, o64, 1e-12 * max(1.0, o64.abs().max().item()), name="out")
    for name, got, r64 in zip(NAMES, grads, g64):
        assert_within_rule(got, r64, r64, 1e-12 * max(1.0, r64.abs().max().item()), name=f"grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_shapes(backend):
    """temperature as (heads,) or as the model's (heads, 1, 1) parameter: same output, gradient shaped
    like the parameter."""
    inp = _inputs(CASES[3])
    t3 = inp.temperature.float().requires_grad_(True)
    t1 = inp.temperature.float().reshape(-1).requires_grad_(True)
    args = [None if t is None else t.float() for t in inp]
    outs = []
    with moce_kernels.backend(backend), poison_outputs():
        for t in (t3, t1):
            out = channel_attention(*args[:3], t, *args[4:])
            out.sum().backward()
            outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert t3.grad.shape == t3.shape and t1.grad.shape == t1.shape
    assert torch.equal(t3.grad.reshape(-1), t1.grad)


def test_reference_is_the_model_formula():
    """The reference equals the authors' transposed attention + project_out + residual, bit for bit
    (float64, packed views)."""
    inp = _inputs(CASES[4])
    x = torch.cat(inp[:3], 1)
    q, k, v = x.chunk(3, 1)
    assert torch.equal(reference_formula(q, k, v, *inp[3:]), _eager(q, k, v, *inp[3:]))
    with moce_kernels.backend("reference"):
        assert torch.equal(channel_attention(q, k, v, *inp[3:]), _eager(q, k, v, *inp[3:]))


def test_gradcheck_reference():
    """The reference's closed-form backward against finite differences (float64, packed views)."""
    inp = _inputs(Case(2, 2, 2, 2, 3, 3, True, True, True))
    x = torch.cat(inp[:3], 1).requires_grad_(True)
    rest = [t.clone().requires_grad_(True) for t in inp[3:]]

    def fn(x, *rest):
        with moce_kernels.backend("reference"):
            return channel_attention(*x.chunk(3, 1), *rest)

    assert torch.autograd.gradcheck(fn, (x, *rest))


# ----------------------------------------------------------------------------------------------
# views: the packed q, k, v reach the kernels without a copy
# ----------------------------------------------------------------------------------------------

class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


_COPIES = ("aten.clone", "aten._to_copy", "aten.contiguous", "aten.copy_")


def _packed_views(B=2, heads=2, c=8, H=5, W=7):
    C = heads * c
    x = torch.randn(B, 3 * C, H, W, device=DEV)
    w = torch.randn(C, C, 1, 1, device=DEV)
    return x, x.chunk(3, 1), torch.ones(heads, 1, 1, device=DEV), w, torch.randn(C, device=DEV)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_reach_the_op_in_place(backend):
    x, (q, k, v), t, w, b = _packed_views()
    res = torch.randn(x.shape[0], w.shape[0], *x.shape[2:], device=DEV)[:, :, :, :]
    with moce_kernels.backend(backend), _Record() as rec:
        channel_attention(q, k, v, t, w, b, res)
    ops = [str(f) for f, _ in rec.calls]
    assert not [o for o in ops if o.startswith(_COPIES)], ops
    (args,) = [a for f, a in rec.calls if str(f) == "moce.channel_attention.default"]
    plane = q[0, 0].numel() * q.element_size()
    assert [a.data_ptr() - x.data_ptr() for a in args[:3]] == [0, q.shape[1] * plane, 2 * q.shape[1] * plane]
    assert args[6].data_ptr() == res.data_ptr()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_take_views_without_copy(backend):
    """The backend's forward and backward on packed views copy nothing (the Triton interpreter's own
    host transfers, ``copy_`` of whole storages, are the only copies allowed off a GPU)."""
    x, (q, k, v), t, w, b = _packed_views()
    g = torch.randn(x.shape[0], w.shape[0], *x.shape[2:], device=DEV)
    allowed = ("aten.copy_",) if DEV == "cpu" and backends.triton_interpreted() else ()
    for op, args in ((OP, (q, k, v, t.reshape(-1), w, b, None, 1e-12)),
                     (OP + "_backward", (g, q, k, v, t.reshape(-1), w, 1e-12))):
        with _Record() as rec:
            backends.implementation(op, backend)(*args)
        copies = [str(f) for f, _ in rec.calls if str(f).startswith(_COPIES) and not str(f).startswith(allowed)]
        assert not copies, f"{op}: {copies}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_stride_contract(backend):
    """Called directly, a kernel backend refuses planes that are not contiguous instead of misreading them."""
    x, (q, k, v), t, w, b = _packed_views()
    with pytest.raises(ValueError, match="planes"):
        backends.implementation(OP, backend)(q, k, v.transpose(2, 3), t.reshape(-1), w, b, None, 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_layouts_are_copied(backend):
    """Inputs outside the stride contract (channels_last, transposed planes) are made contiguous first."""
    inp = _inputs(CASES[0])
    args = [None if t is None else t.float() for t in inp]
    q_cl = args[0].to(memory_format=torch.channels_last)
    k_t = args[1].transpose(2, 3).contiguous().transpose(2, 3)
    with moce_kernels.backend(backend), poison_outputs():
        ref = channel_attention(*args)
        out = channel_attention(q_cl, k_t, *args[2:6], args[6].to(memory_format=torch.channels_last))
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------------------------
# opcheck, errors, Triton split coverage
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed,bias,res", [(True, True, True), (False, False, False)])
def test_opcheck(backend, packed, bias, res):
    inp = _inputs(Case(2, 2, 4, 5, 3, 6, bias, res, packed))
    f = [None if t is None else t.float() for t in inp]
    q, k, v = torch.cat(f[:3], 1).chunk(3, 1) if packed else f[:3]
    t = f[3].reshape(-1)
    args = [a if a is None else a.detach().requires_grad_(True) for a in (q, k, v, t, *f[4:])] + [1e-12]
    grad = torch.randn(2, 6, 5, 3, device=DEV)
    with moce_kernels.backend(backend):
        torch.library.opcheck(torch.ops.moce.channel_attention.default, tuple(args))
        torch.library.opcheck(torch.ops.moce.channel_attention_backward.default,
                              (grad, q, k, v, t, f[4], 1e-12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    inp = _inputs(Case(1, 2, 3, 4, 5, 0, True, True, False))
    q, k, v, t, w, b, r = (x.float() for x in inp)
    with moce_kernels.backend(backend):
        with pytest.raises(ValueError, match="shape"):
            channel_attention(q, k[:, :, :3], v, t, w)
        with pytest.raises(ValueError, match="temperature"):
            channel_attention(q, k, v, t.reshape(1, 2, 1), w)
        with pytest.raises(ValueError, match="divide"):
            channel_attention(q, k, v, torch.ones(4, device=DEV), w)
        with pytest.raises(ValueError, match="proj_weight"):
            channel_attention(q, k, v, t, w[:, :5])
        with pytest.raises(ValueError, match="proj_bias"):
            channel_attention(q, k, v, t, w, b[:5])
        with pytest.raises(ValueError, match="residual"):
            channel_attention(q, k, v, t, w, b, r[:, :5])
        with pytest.raises(ValueError, match="dtype"):
            channel_attention(q, k, v.double(), t, w)
        with pytest.raises(ValueError, match="dtype"):
            channel_attention(q, k, v, t, w.half())
        with pytest.raises(TypeError, match="dtype"):
            channel_attention(q.int(), k.int(), v.int(), t, w)
        with pytest.raises(ValueError, match="device"):
            channel_attention(q, k, v, t, w.to("meta"))
        with pytest.raises(ValueError, match="eps"):
            channel_attention(q, k, v, t, w, eps=0.0)
        with pytest.raises(ValueError, match="empty"):
            channel_attention(q[:0], k[:0], v[:0], t, w)


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS or DEV != "cpu", reason="the CPU split rule")
def test_split_paths_covered():
    """CASES run the Triton Gram passes with one pixel chunk and with several (two-stage reduction)."""
    from moce_kernels.triton import channel_attention as tca
    diag = {tca.splits(cs.B * cs.heads, cs.H * cs.W, torch.device(DEV))[0] > 1 for cs in CASES}
    blocks = lambda n: -(-n // tca.BLOCK_F)  # noqa: E731
    full = {tca.splits(cs.B * blocks(cs.c_out or cs.heads * cs.c) * blocks(cs.heads * cs.c), cs.H * cs.W,
                       torch.device(DEV))[0] > 1 for cs in CASES}
    assert diag == {False, True} and full == {False, True}


# the model's shapes on a GPU: MoCE-IR's levels (c = 48) and MoCE-IR-S's (c = 32), batch 2, 64 x 48
GPU_CASES = [Case(2, h, c, 64, 48, 0, bias, True, True) for c in (48, 32) for h, bias in ((1, True), (8, False))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_model_shapes(backend, dtype, case):
    _check(backend, case, dtype)
