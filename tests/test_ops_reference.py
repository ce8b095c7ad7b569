"""The ops layer with the reference backend: independent oracles, opcheck, gradcheck, input errors."""
from typing import List

import pytest
import torch
import torch.nn.functional as F

import moce_kernels
from moce_kernels import ops
from moce_kernels.expert_stage.weights import ExpertWeights, flatten
from moce_kernels.ops import routing as R

pytestmark = pytest.mark.usefixtures("_reference_backend")


@pytest.fixture
def _reference_backend():
    with moce_kernels.backend("reference"):
        yield


def direct_window_attention(q, k, v, p, w, b, eps=1e-5):
    """Float64 oracle by the definition: out[i,j] = sum_{a,c} q[a,c] k[(i-a)%p, (j-c)%p] per window."""
    B, C, H, W = q.shape
    Hp, Wp = -(-H // p) * p, -(-W // p) * p
    qp = F.pad(q, (0, Wp - W, 0, Hp - H)).double()
    kp = F.pad(k, (0, Wp - W, 0, Hp - H)).double()
    out = torch.zeros_like(qp)
    for wi in range(0, Hp, p):
        for wj in range(0, Wp, p):
            qw, kw = qp[..., wi:wi + p, wj:wj + p], kp[..., wi:wi + p, wj:wj + p]
            acc = torch.zeros_like(qw)
            for a in range(p):
                for c in range(p):
                    acc += qw[..., a:a + 1, c:c + 1] * torch.roll(kw, shifts=(a, c), dims=(-2, -1))
            out[..., wi:wi + p, wj:wj + p] = acc
    out = out[..., :H, :W]
    mu = out.mean(1, keepdim=True)
    var = out.var(1, keepdim=True, unbiased=False)
    return ((out - mu) / torch.sqrt(var + eps) * w.double()[:, None, None] + b.double()[:, None, None]) * v.double()


@pytest.mark.parametrize("p", [4, 8, 16, 32])
@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 5, 33, 17)])
def test_window_attention_reference_matches_definition(p, shape):
    if p == 32 and shape[2] > 9:
        shape = (1, 2, 33, 17)
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    w, b = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    got = ops.window_fft_attention(q, k, v, p, w, b)
    torch.testing.assert_close(got, direct_window_attention(q, k, v, p, w, b), rtol=1e-9, atol=1e-9)


def _wa_args(dtype=torch.float64, shape=(2, 3, 6, 5), p=4):
    t = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    return (t(*shape), t(*shape), t(*shape), p, t(shape[1]), t(shape[1]), 1e-5)


def _pwdw_args(k=3, bias=True, c_out=6, dtype=torch.float64):
    t = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    return (t(2, 3, 5, 7), t(c_out, 3, 1, 1), t(c_out, 1, k, k), t(c_out) if bias else None, t(c_out) if bias else None)


def _route_args(B=5, C=4, E=4, k=2, loss=True):
    t = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    return (t(B, C, 3, 4), t(B, 6), t(E, C), t(E, 6), torch.rand(E, dtype=torch.float64) + 0.1,
            torch.randn(B, E, dtype=torch.float64) * 0.25, k, 0.25, loss, True)


def _expert_weights(C, ranks, dtype=torch.float64) -> List[ExpertWeights]:
    return [ExpertWeights(*((torch.randn(s, dtype=dtype) * 0.5).requires_grad_(True)
                            for s in ExpertWeights.shapes(C, r, 3, 7))) for r in ranks]


def test_opcheck_every_op():
    from torch.library import opcheck
    opcheck(torch.ops.moce.window_fft_attention.default, _wa_args(torch.float32))
    for gated, op in ((False, torch.ops.moce.pointwise_depthwise_conv.default),
                      (True, torch.ops.moce.pointwise_depthwise_conv_gated.default)):
        opcheck(op, _pwdw_args(bias=True))
        opcheck(op, _pwdw_args(k=7, bias=False))
    opcheck(torch.ops.moce.moe_route.default, _route_args())
    idx = torch.tensor([[1, 3], [0, 1], [3, 2]])
    opcheck(torch.ops.moce.moe_dispatch.default, (idx, 4))
    counts, offsets, perm = ops.moe_dispatch(idx, 4)
    x, s = torch.randn(3, 4, 5, 6, dtype=torch.float64), torch.randn(3, 4, 5, 6, dtype=torch.float64)
    ws = flatten(_expert_weights(4, [1, 1, 2, 4]))
    opcheck(torch.ops.moce.moe_experts.default, (x.requires_grad_(), s, perm, offsets, 2, ws, [4, 8, 16, 32],
                                                 [1, 1, 2, 1]))
    rows = torch.randn(6, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    opcheck(torch.ops.moce.moe_combine.default, (rows, gates, perm))


def test_opcheck_backward_ops():
    """The backward ops are ops too: schema, fake implementation, traceability."""
    from torch.library import opcheck
    d = lambda args: tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)  # noqa: E731
    wa = d(_wa_args(torch.float32))
    opcheck(torch.ops.moce.window_fft_attention_backward.default, (torch.randn_like(wa[0]),) + wa)
    for name in ("pointwise_depthwise_conv_backward", "pointwise_depthwise_conv_gated_backward"):
        for args in (d(_pwdw_args()), d(_pwdw_args(k=7, bias=False))):
            c_out = args[1].shape[0] // (2 if "gated" in name else 1)
            opcheck(getattr(torch.ops.moce, name).default, (torch.randn(2, c_out, 5, 7, dtype=torch.float64),) + args)
    ra = d(_route_args())
    grads = (torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64),
             torch.randn((), dtype=torch.float64))
    opcheck(torch.ops.moce.moe_route_backward.default, grads + ra)
    idx = torch.tensor([[1, 3], [0, 1], [3, 2]])
    _, offsets, perm = ops.moe_dispatch(idx, 4)
    x, s = torch.randn(3, 4, 5, 6, dtype=torch.float64), torch.randn(3, 4, 5, 6, dtype=torch.float64)
    ws = [w.detach() for w in flatten(_expert_weights(4, [1, 1, 2, 4]))]
    opcheck(torch.ops.moce.moe_experts_backward.default,
            (torch.randn(6, 4, 5, 6, dtype=torch.float64), x, s, perm, offsets, 2, ws, [4, 8, 16, 32], [1, 1, 2, 1]))
    opcheck(torch.ops.moce.moe_combine_backward.default,
            (torch.randn(3, 4, 5, 6, dtype=torch.float64), torch.randn(6, 4, 5, 6, dtype=torch.float64),
             torch.rand(3, 2, dtype=torch.float64), perm))


def test_gradcheck_window_attention_and_convs():
    q, k, v, p, w, b, eps = _wa_args()
    assert torch.autograd.gradcheck(lambda *a: ops.window_fft_attention(a[0], a[1], a[2], p, a[3], a[4]),
                                    (q, k, v, w, b), fast_mode=True)
    for fn in (ops.pointwise_depthwise_conv, ops.pointwise_depthwise_conv_gated):
        args = _pwdw_args(k=5)
        assert torch.autograd.gradcheck(fn, args, fast_mode=True)
        args = _pwdw_args(k=3, bias=False)
        assert torch.autograd.gradcheck(lambda x, a, c: fn(x, a, c), args[:3], fast_mode=True)


def test_gradcheck_routing_ops():
    args = _route_args()
    x, f, gw, fw = args[:4]

    def route_outputs(x, f, gw, fw):
        gates, _, logits, loss = ops.moe_route(x, f, gw, fw, *args[4:])
        return gates, logits, loss

    assert torch.autograd.gradcheck(route_outputs, (x, f, gw, fw), fast_mode=True)
    idx = torch.tensor([[2, 0], [2, 1], [0, 3]])
    _, offsets, perm = ops.moe_dispatch(idx, 4)
    rows = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, g: ops.moe_combine(r, g, perm), (rows, gates), fast_mode=True)
    xs = torch.randn(3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    sh = torch.randn(3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    ws = _expert_weights(4, [1, 1, 2, 4])
    sub = [(0, "proj0"), (0, "q"), (0, "kv"), (1, "proj2"), (3, "proj_out")]  # weights of different experts and kinds

    def run(x, s, *picked):
        full = list(ws)
        for (e, name), w in zip(sub, picked):
            full[e] = full[e]._replace(**{name: w})
        return ops.moe_experts(x, s, perm, offsets, 2, full, [4, 8, 16, 32], [1, 1, 1, 2])

    assert torch.autograd.gradcheck(run, (xs, sh, *[getattr(ws[e], name) for e, name in sub]), fast_mode=True)


def test_dispatch_and_combine_semantics():
    idx = torch.tensor([[3, 1], [1, 0], [3, 2], [1, 3]])
    counts, offsets, perm = ops.moe_dispatch(idx, 4)
    assert counts.tolist() == [1, 3, 1, 3]
    assert offsets.tolist() == [0, 1, 4, 5, 8]
    assert perm.tolist() == [3, 1, 2, 6, 5, 0, 4, 7]
    rows = torch.randn(8, 2, 2, 2)
    gates = torch.rand(4, 2)
    out = ops.moe_combine(rows, gates, perm)
    pos = {s: r for r, s in enumerate(perm.tolist())}
    for b in range(4):
        want = gates[b, 0] * rows[pos[2 * b]] + gates[b, 1] * rows[pos[2 * b + 1]]
        torch.testing.assert_close(out[b], want)


def test_router_matches_manual_formula():
    B, C, E, k = 6, 5, 4, 1
    x, f = torch.randn(B, C, 4, 4, dtype=torch.float64), torch.randn(B, 3, dtype=torch.float64)
    gw, fw = torch.randn(E, C, dtype=torch.float64), torch.randn(E, 3, dtype=torch.float64)
    cx = torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    noise = torch.randn(B, E, dtype=torch.float64) * 0.25
    gates, idx, logits, loss = ops.moe_route(x, f, gw, fw, cx, noise, k, 0.25, True, True)
    want_logits = x.mean((2, 3)) @ gw.T + f @ fw.T
    torch.testing.assert_close(logits, want_logits)
    scores = (want_logits + noise).softmax(-1)
    torch.testing.assert_close(gates, scores.max(-1, keepdim=True).values)
    assert torch.equal(idx, scores.argmax(-1, keepdim=True))
    imp = want_logits.softmax(-1).sum(0) * cx
    thr = (want_logits + noise).max(-1, keepdim=True).values
    load = (1 - torch.distributions.Normal(0.0, 1.0).cdf((thr - want_logits) / 0.25)).mean(0)
    cv2 = lambda v: (v.std() / (v.mean() + 1e-8)) ** 2  # noqa: E731
    torch.testing.assert_close(loss, 0.5 * cv2(imp) + 0.5 * cv2(load))


def test_op_input_errors():
    q = torch.randn(1, 2, 8, 8)
    w, b = torch.ones(2), torch.zeros(2)
    with pytest.raises(ValueError, match="window_size must be one of"):
        ops.window_fft_attention(q, q, q, 5, w, b)
    with pytest.raises(ValueError, match="k has shape"):
        ops.window_fft_attention(q, q[:, :, :4], q, 4, w, b)
    with pytest.raises(ValueError, match="channels"):
        ops.window_fft_attention(q, q, q, 4, torch.ones(3), b)
    with pytest.raises(TypeError, match="dtype"):
        ops.window_fft_attention(q.int(), q.int(), q.int(), 4, w, b)
    with pytest.raises(ValueError, match="4 dimensions"):
        ops.window_fft_attention(q[0], q[0], q[0], 4, w, b)
    with pytest.raises(ValueError, match="dtype"):
        ops.window_fft_attention(q, q.double(), q, 4, w, b)
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(ValueError, match="pw_weight must have shape"):
        ops.pointwise_depthwise_conv(x, torch.randn(4, 2, 1, 1), torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="dw_weight must have shape"):
        ops.pointwise_depthwise_conv(x, torch.randn(4, 3, 1, 1), torch.randn(4, 1, 4, 4))
    with pytest.raises(ValueError, match="even C_out"):
        ops.pointwise_depthwise_conv_gated(x, torch.randn(5, 3, 1, 1), torch.randn(5, 1, 3, 3))
    with pytest.raises(ValueError, match="pw_bias must have 4 entries"):
        ops.pointwise_depthwise_conv(x, torch.randn(4, 3, 1, 1), torch.randn(4, 1, 3, 3), torch.zeros(3))
    with pytest.raises(TypeError, match="int64"):
        ops.moe_dispatch(torch.zeros(2, 1, dtype=torch.int32), 4)
    args = list(_route_args(k=2))
    args[6] = 5
    with pytest.raises(ValueError, match="k must be in"):
        ops.moe_route(*args)
    with pytest.raises(ValueError, match="13 weights per expert"):
        ops.moe_experts(x, x, torch.zeros(1, dtype=torch.int64), torch.zeros(5, dtype=torch.int64), 1, [], [4] * 4,
                        [1] * 4)
    with pytest.raises(ValueError, match="B\\*k"):
        ops.moe_combine(torch.randn(3, 2, 2, 2), torch.rand(2, 2), torch.arange(4))


def test_fake_implementations_under_compile():
    """Every op traces with fake tensors (shape propagation) inside torch.compile."""
    q = torch.randn(2, 3, 9, 7)
    w, b = torch.ones(3), torch.zeros(3)

    @torch.compile(fullgraph=True, backend="eager")
    def f(q, w, b):
        return ops.window_fft_attention(q, q, q, 8, w, b) + 1

    torch.testing.assert_close(f(q, w, b), ops.window_fft_attention(q, q, q, 8, w, b) + 1)
