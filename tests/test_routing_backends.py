"""Routing ops (moe_route, moe_dispatch, moe_combine and their backwards): every available backend
against the float64 reference under the rule of DESIGN.md, outputs poisoned with NaN; gradients;
opcheck; routing that spreads images over experts (and leaves one empty); the official reference data;
error cases. Triton runs in the interpreter without a GPU, so CPU shapes stay tiny."""
from __future__ import annotations

import copy
import os
from typing import Dict, List, Tuple

import pytest
import torch

import moce_kernels
from moce_kernels import ops
from moce_kernels.backends import BackendUnavailableError
from moce_kernels.model import MoCEIR
from moce_kernels.model.moe import AdapterLayer
from moce_kernels.reference import routing as ref
from moce_kernels.testing import assert_within_rule, poison_outputs

from test_experts_backends import make_weights

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = moce_kernels.available_backends()
FAST = [b for b in BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _atol(ref64: torch.Tensor, out_dtype: torch.dtype = torch.float32, rel: float = 1e-5) -> float:
    """Small atol: ``rel`` relative to the output's scale, plus one unit in the last place of a 16-bit
    output (a kernel that rounds a slightly different fp32 value may land on the neighbouring value)."""
    scale = ref64.double().abs().max().item() if ref64.numel() else 0.0
    ulp = torch.finfo(out_dtype).eps * scale if out_dtype in (torch.float16, torch.bfloat16) else 0.0
    return rel * (1.0 + scale) + ulp


# ----------------------------------------------------------------------------- router inputs
def _router_inputs(B: int, C: int, H: int, W: int, E: int, F: int, dtype: torch.dtype, noise: bool = True,
                   min_gap: float = 2e-3) -> Dict[str, torch.Tensor]:
    """Random router inputs whose noisy logits have no near-ties (so top-k is unambiguous in fp32)."""
    for _ in range(100):
        x = (torch.randn(B, C, H, W, device=DEVICE) + torch.randn(B, C, 1, 1, device=DEVICE)).to(dtype)
        inp = dict(x=x, freq_emb=torch.randn(B, F, device=DEVICE).to(dtype),
                   gate_weight=(torch.randn(E, C, device=DEVICE) / C ** 0.5).to(dtype),
                   freq_weight=(torch.randn(E, F, device=DEVICE) / F ** 0.5).to(dtype),
                   complexity=torch.rand(E, device=DEVICE) + 0.1,
                   noise=torch.randn(B, E, device=DEVICE) / E if noise else torch.zeros(B, E, device=DEVICE))
        logits = ref.router_logits(*(inp[n].double() for n in ("x", "freq_emb", "gate_weight", "freq_weight")))
        noisy = (logits + inp["noise"].double()).sort(dim=-1).values
        if E == 1 or (noisy[:, 1:] - noisy[:, :-1]).min().item() > min_gap:
            return inp
    raise RuntimeError("could not draw router inputs without near-ties")


def _double(inp: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {n: t.double() for n, t in inp.items()}


def _route(inp: Dict[str, torch.Tensor], k: int, loss: bool, cplx: bool, backend: str):
    with moce_kernels.backend(backend), poison_outputs():
        return ops.moe_route(inp["x"], inp["freq_emb"], inp["gate_weight"], inp["freq_weight"], inp["complexity"],
                             inp["noise"], k, 0.25, loss, cplx)


ROUTE_CASES = [(1, False, False), (2, True, True), (1, True, False), (2, False, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,loss,cplx", ROUTE_CASES)
def test_route_forward(backend, dtype, k, loss, cplx):
    inp = _router_inputs(5, 7, 9, 11, 4, 6, dtype)
    out = _route(inp, k, loss, cplx, backend)
    out64 = _route(_double(inp), k, loss, cplx, "reference")
    outd = _route(inp, k, loss, cplx, "reference")
    gates, indices, logits, lss = out
    assert gates.dtype == torch.float32 and logits.dtype == torch.float32 and lss.dtype == torch.float32
    assert indices.dtype == torch.int64 and indices.shape == (5, k)
    assert torch.equal(indices, out64[1]), f"indices {indices.tolist()} != reference {out64[1].tolist()}"
    for name, a, r64, rd in (("gates", gates, out64[0], outd[0]), ("logits", logits, out64[2], outd[2]),
                             ("loss", lss, out64[3], outd[3])):
        assert_within_rule(a, r64, rd, _atol(r64), name)
    if not loss:
        assert lss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,loss,cplx", [(2, True, True), (1, True, False), (2, False, False)])
def test_route_backward(backend, dtype, k, loss, cplx):
    inp = _router_inputs(4, 6, 5, 7, 4, 5, dtype)
    B, E = 4, 4
    wg, wl, wL = torch.randn(B, k, device=DEVICE), torch.randn(B, E, device=DEVICE), torch.randn((), device=DEVICE)
    names = ("x", "freq_emb", "gate_weight", "freq_weight")

    def grads(src: Dict[str, torch.Tensor], be: str) -> List[torch.Tensor]:
        leaves = {n: (t.detach().clone().requires_grad_(True) if n in names else t) for n, t in src.items()}
        gates, _, logits, lss = _route(leaves, k, loss, cplx, be)
        obj = (gates * wg.to(gates.dtype)).sum() + (logits * wl.to(logits.dtype)).sum()
        if loss:
            obj = obj + lss * wL.to(lss.dtype)
        with moce_kernels.backend(be), poison_outputs():
            obj.backward()
        return [leaves[n].grad for n in names]

    got, g64, gd = grads(inp, backend), grads(_double(inp), "reference"), grads(inp, "reference")
    for n, a, r64, rd in zip(names, got, g64, gd):
        assert a.dtype == inp[n].dtype
        assert_within_rule(a, r64, rd, _atol(r64, a.dtype), f"grad {n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,E,k,loss", [(1, 1, 1, False), (2, 3, 2, True), (33, 5, 3, True), (3, 8, 8, True),
                                        (1, 6, 2, True)])
def test_route_shapes(backend, B, E, k, loss):
    """Odd expert counts, k = E, a single expert, one image, many images: forward and backward."""
    inp = _router_inputs(B, 5, 3, 4, E, 3, torch.float32)
    names = ("x", "freq_emb", "gate_weight", "freq_weight")

    def run(src, be):
        leaves = {n: (t.detach().clone().requires_grad_(True) if n in names else t) for n, t in src.items()}
        out = _route(leaves, k, loss, True, be)
        obj = out[0].sum() + (out[2] * torch.arange(E, device=DEVICE)).sum() + (out[3] if loss else 0.0)
        with moce_kernels.backend(be), poison_outputs():
            obj.backward()
        return out, [leaves[n].grad for n in names]

    (out, grads), (out64, g64), (outd, gd) = run(inp, backend), run(_double(inp), "reference"), run(inp, "reference")
    assert torch.equal(out[1], out64[1])
    for i, n in ((0, "gates"), (2, "logits"), (3, "loss")):
        assert_within_rule(out[i].detach(), out64[i].detach(), outd[i].detach(), _atol(out64[i]), n)
    for n, a, r64, rd in zip(names, grads, g64, gd):
        assert_within_rule(a, r64, rd, _atol(r64), f"grad {n}")


def test_route_gradcheck_reference():
    inp = _double(_router_inputs(3, 4, 3, 5, 4, 3, torch.float32))
    args = [inp[n].requires_grad_(True) for n in ("x", "freq_emb", "gate_weight", "freq_weight")]

    def f(x, fe, gw, fw):
        with moce_kernels.backend("reference"):
            g, _, lg, lss = ops.moe_route(x, fe, gw, fw, inp["complexity"], inp["noise"], 2, 0.25, True, True)
        return g, lg, lss

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- dispatch
def _random_indices(B: int, k: int, E: int, used: int) -> torch.Tensor:
    """(B, k) distinct experts per image drawn from the first ``used`` experts."""
    return torch.stack([torch.randperm(used, device=DEVICE)[:k] for _ in range(B)]).to(torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,k,E,used", [(1, 1, 4, 4), (7, 2, 4, 3), (5, 1, 4, 2), (600, 2, 5, 5), (3, 3, 3, 3)])
def test_dispatch(backend, B, k, E, used):
    idx = _random_indices(B, k, E, used)
    with moce_kernels.backend(backend), poison_outputs():
        counts, offsets, perm = ops.moe_dispatch(idx, E)
    rc, ro, rp = ref.dispatch(idx, E)
    assert counts.dtype == offsets.dtype == perm.dtype == torch.int64
    assert torch.equal(counts, rc) and torch.equal(offsets, ro) and torch.equal(perm, rp)
    if used < E:
        assert counts[used:].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_any_indices(backend):
    """Repeated experts within an image (not produced by top-k, but valid input) still sort stably."""
    idx = torch.randint(0, 3, (9, 2), device=DEVICE)
    with moce_kernels.backend(backend), poison_outputs():
        out = ops.moe_dispatch(idx, 3)
    for a, r in zip(out, ref.dispatch(idx, 3)):
        assert torch.equal(a, r)


# ----------------------------------------------------------------------------- combine
def _combine_inputs(B: int, k: int, E: int, shape: Tuple[int, int, int], dtype: torch.dtype):
    idx = _random_indices(B, k, E, E)
    perm = ref.dispatch(idx, E)[2]
    eo = torch.randn((B * k,) + shape, device=DEVICE).to(dtype)
    gates = torch.rand(B, k, device=DEVICE)
    return eo, gates, perm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,k", [(3, 1), (4, 2), (1, 3)])
def test_combine_forward(backend, dtype, B, k):
    eo, gates, perm = _combine_inputs(B, k, 4, (5, 7, 9), dtype)
    with moce_kernels.backend(backend), poison_outputs():
        out = ops.moe_combine(eo, gates, perm)
    r64 = ref.combine(eo.double(), gates.double(), perm)
    rd = ref.combine(eo, gates, perm)
    assert out.dtype == dtype
    assert_within_rule(out, r64, rd, _atol(r64, dtype), "combine")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,k", [(3, 1), (4, 2)])
def test_combine_backward(backend, dtype, B, k):
    eo, gates, perm = _combine_inputs(B, k, 4, (3, 5, 7), dtype)
    grad = torch.randn((B,) + tuple(eo.shape[1:]), device=DEVICE).to(dtype)

    def grads(e: torch.Tensor, g: torch.Tensor, gr: torch.Tensor, be: str):
        e, g = e.detach().clone().requires_grad_(True), g.detach().clone().requires_grad_(True)
        with moce_kernels.backend(be), poison_outputs():
            ops.moe_combine(e, g, perm).backward(gr)
        return e.grad, g.grad

    got = grads(eo, gates, grad, backend)
    g64 = grads(eo.double(), gates.double(), grad.double(), "reference")
    gd = grads(eo, gates, grad, "reference")
    for n, a, r64, rd in zip(("expert_out", "gates"), got, g64, gd):
        assert_within_rule(a, r64, rd, _atol(r64, a.dtype), f"grad {n}")


def test_combine_gradcheck_reference():
    eo, gates, perm = _combine_inputs(3, 2, 4, (2, 3, 3), torch.float64)
    eo.requires_grad_(True)
    gates = gates.double().requires_grad_(True)
    with moce_kernels.backend("reference"):
        assert torch.autograd.gradcheck(lambda e, g: ops.moe_combine(e, g, perm), (eo, gates))


# ----------------------------------------------------------------------------- opcheck
def _opcheck_args(dtype: torch.dtype = torch.float32):
    inp = _router_inputs(3, 5, 4, 6, 4, 3, dtype)
    route = (inp["x"], inp["freq_emb"], inp["gate_weight"], inp["freq_weight"], inp["complexity"], inp["noise"], 2,
             0.25, True, True)
    grads = (torch.randn(3, 2, device=DEVICE), torch.randn(3, 4, device=DEVICE), torch.randn((), device=DEVICE))
    eo, gates, perm = _combine_inputs(3, 2, 4, (2, 3, 5), dtype)
    return {
        "moe_route": route,
        "moe_route_backward": grads + route,
        "moe_dispatch": (_random_indices(5, 2, 4, 4), 4),
        "moe_combine": (eo, gates, perm),
        "moe_combine_backward": (torch.randn(3, 2, 3, 5, device=DEVICE).to(dtype), eo, gates, perm),
    }


OPCHECK_CASES = [(b, op) for b in BACKENDS for op in ("moe_route", "moe_dispatch", "moe_combine", "moe_route_backward",
                                                      "moe_combine_backward")]


@pytest.mark.parametrize("backend,op", OPCHECK_CASES)
def test_opcheck(backend, op):
    args = _opcheck_args()[op]
    if op in ("moe_route", "moe_combine"):  # differentiable inputs
        args = tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and i < (4 if op == "moe_route" else 2) else a for i, a in enumerate(args))
    with moce_kernels.backend(backend):
        torch.library.opcheck(getattr(torch.ops.moce, op).default, args)


# ----------------------------------------------------------------------------- spread routing, layer level
def _spread_router(B: int, C: int, E: int, dtype: torch.dtype):
    """Inputs whose image b goes to expert ``b % (E - 1)`` first (expert E-1 never chosen first)."""
    x = 0.1 * torch.randn(B, C, 6, 5, device=DEVICE)
    for b in range(B):
        x[b, b % (E - 1)] += 3.0
    gw = torch.zeros(E, C, device=DEVICE)
    gw[:, :min(C, E)] = torch.eye(E, min(C, E), device=DEVICE)
    gw[E - 1] = -1.0  # the last expert always loses
    F = 3
    return dict(x=x.to(dtype), freq_emb=torch.zeros(B, F, device=DEVICE).to(dtype), gate_weight=gw.to(dtype),
                freq_weight=(0.01 * torch.randn(E, F, device=DEVICE)).to(dtype),
                complexity=torch.ones(E, device=DEVICE), noise=torch.zeros(B, E, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2])
def test_images_take_different_experts(backend, k):
    B, C, E = 5, 6, 4
    inp = _spread_router(B, C, E, torch.float32)
    gates, indices, _, _ = _route(inp, k, False, False, backend)
    assert indices[:, 0].tolist() == [b % (E - 1) for b in range(B)]
    assert not (indices == E - 1).any(), "expert E-1 should receive no image"
    with moce_kernels.backend(backend), poison_outputs():
        counts, offsets, perm = ops.moe_dispatch(indices, E)
    assert counts[E - 1].item() == 0 and offsets[E - 1].item() == offsets[E].item() == B * k
    # expert rows: row r holds a distinct pattern of its image and expert, so combine must pick the right one
    rows = torch.randn(B * k, C, 3, 4, device=DEVICE)
    with moce_kernels.backend(backend), poison_outputs():
        out = ops.moe_combine(rows, gates, perm)
    expect = ref.combine(rows.double(), gates.double(), perm)
    assert_within_rule(out, expect, ref.combine(rows, gates, perm), 1e-6, "combine")


def _load_tiny(reference_dir: str, name: str) -> Tuple[dict, MoCEIR]:
    data = torch.load(os.path.join(reference_dir, name))
    model = MoCEIR(**data["config"], routing_noise="never")
    model.load_state_dict(data["state_dict"])
    return data, model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["official_tiny_top1.pt", "official_tiny_top2.pt"])
def test_official_router_logits_gates_loss(reference_dir, backend, name):
    """Logits of every MoCE layer, their top-k gates, and the model's aux loss (mean over layers) against
    the official code's recorded values (train batch, zero noise)."""
    data, model = _load_tiny(reference_dir, name)
    mods = dict(model.named_modules())
    losses = []
    for rec in data["train"]["adapters"]:
        layer = mods[rec["name"]]
        r = layer.routing
        x, fe = rec["x"].to(DEVICE), rec["freq_emb"].to(DEVICE)
        with moce_kernels.backend(backend), poison_outputs():
            gates, indices, logits, loss = ops.moe_route(
                x, fe, r.gate[2].weight.detach().to(DEVICE), r.freq_gate.weight.detach().to(DEVICE),
                r.complexity.to(DEVICE), torch.zeros(x.shape[0], r.num_experts, device=DEVICE), r.k, r.noise_std,
                True, r.use_complexity_bias)
        want = rec["logits"].to(DEVICE)
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-5)
        top = want.softmax(-1).topk(r.k, dim=-1)
        torch.testing.assert_close(gates, top.values, rtol=1e-4, atol=1e-5)
        assert torch.equal(indices, top.indices)
        losses.append(loss)
    total = torch.stack(losses).mean()
    torch.testing.assert_close(total.cpu(), data["train"]["aux_loss"].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_layer_output(reference_dir, backend):
    """route -> dispatch (backend) -> experts (reference) -> combine (backend) -> proj_out reproduces the
    official MoCE layer output (eval case 0 of the top-2 data)."""
    data, model = _load_tiny(reference_dir, "official_tiny_top2.pt")
    model.eval().to(DEVICE)
    mods = dict(model.named_modules())
    for rec in data["eval"][0]["adapters"]:
        layer = mods[rec["name"]]
        x, fe, sh = rec["x"].to(DEVICE), rec["freq_emb"].to(DEVICE), rec["shared"].to(DEVICE)
        with torch.no_grad():
            with moce_kernels.backend(backend), poison_outputs():
                gates, indices, _, _ = layer.route(x, fe)
                _, offsets, perm = ops.moe_dispatch(indices, layer.num_experts)
            with moce_kernels.backend("reference"):
                mods_e = layer.expert_modules()
                rows = ops.moe_experts(x, sh, perm, offsets, layer.top_k, layer.expert_weights(),
                                       [m.patch_size for m in mods_e], [m.depth for m in mods_e])
            with moce_kernels.backend(backend), poison_outputs():
                out = layer.proj_out(ops.moe_combine(rows, gates, perm))
        torch.testing.assert_close(out.cpu(), rec["out"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moce_layer_train_forward_backward(backend):
    """The whole MoCE layer (route -> dispatch -> experts -> combine -> proj_out, aux loss) in training,
    forward and backward, against the layer run in float64 on the reference."""
    try:
        moce_kernels.backends.implementation("moe_experts", backend)
    except NotImplementedError:
        pytest.skip(f"no {backend} moe_experts")
    torch.manual_seed(0)
    layer = AdapterLayer(8, 2, top_k=2, rank_type="spread", depth_type="constant", freq_dim=16,
                         with_complexity=True, complexity_scale="max", routing_noise="never").to(DEVICE).train()
    x, fe, sh = torch.randn(3, 8, 8, 8, device=DEVICE), torch.randn(3, 16, device=DEVICE), \
        torch.randn(3, 8, 8, 8, device=DEVICE)
    with torch.no_grad():  # spread the images over the experts
        layer.routing.freq_gate.weight.zero_()
        layer.routing.freq_gate.weight[:, :4] = 4.0 * torch.eye(4, device=DEVICE)
        fe[:, :4] = torch.eye(4, device=DEVICE)[[0, 2, 3]] + 0.5 * torch.eye(4, device=DEVICE)[[1, 1, 0]]

    def run(mod, be, dt):
        xs = x.detach().clone().to(dt).requires_grad_(True)
        with moce_kernels.backend(be), poison_outputs():
            out = mod(xs, fe.to(dt), sh.to(dt))
            (out.square().sum() + 10.0 * mod.loss).backward()
        grads = [xs.grad] + [p.grad for p in mod.routing.parameters()]
        mod.zero_grad(set_to_none=True)
        return [out.detach(), mod.loss.detach()] + grads

    layer64 = copy.deepcopy(layer).double()
    got = run(layer, backend, torch.float32)
    want32 = run(layer, "reference", torch.float32)
    want64 = run(layer64, "reference", torch.float64)
    for n, a, r64, rd in zip(("out", "loss", "grad x", "grad gate", "grad freq_gate"), got, want64, want32):
        assert_within_rule(a, r64, rd, _atol(r64, rel=1e-4), n)


# ----------------------------------------------------------------------------- errors
def test_errors():
    inp = _router_inputs(2, 3, 4, 4, 4, 2, torch.float32)
    args = [inp[n] for n in ("x", "freq_emb", "gate_weight", "freq_weight", "complexity", "noise")]
    with pytest.raises(ValueError, match="k must be"):
        ops.moe_route(*args, 5, 0.25, False, True)
    with pytest.raises(ValueError, match="k must be"):
        ops.moe_route(*args, 0, 0.25, False, True)
    with pytest.raises(ValueError, match="gate_weight"):
        ops.moe_route(args[0], args[1], args[2][:, :2], *args[3:], 1, 0.25, False, True)
    with pytest.raises(ValueError, match="noise"):
        ops.moe_route(*args[:5], args[5][:1], 1, 0.25, False, True)
    with pytest.raises(TypeError, match="dtype"):
        ops.moe_dispatch(torch.zeros(2, 1, device=DEVICE), 4)
    with pytest.raises(ValueError, match="num_experts"):
        ops.moe_dispatch(torch.zeros(2, 1, dtype=torch.int64, device=DEVICE), 0)
    eo, gates, perm = _combine_inputs(2, 2, 4, (2, 2, 2), torch.float32)
    with pytest.raises(ValueError, match="B\\*k"):
        ops.moe_combine(eo[:3], gates, perm)
    with pytest.raises(ValueError, match="B\\*k"):
        ops.moe_combine(eo, gates, perm[:3])
    with pytest.raises(ValueError, match="unknown backend"):
        with moce_kernels.backend("nope"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_backend_unavailable_message():
    previous = moce_kernels.settings.update(cuda_emulation=False)
    try:
        with pytest.raises(BackendUnavailableError, match="cuda"):
            with moce_kernels.backend("cuda"):
                pass
    finally:
        moce_kernels.settings.update(cuda_emulation=previous.cuda_emulation)


@pytest.mark.skipif("triton" not in FAST, reason="triton unavailable")
def test_triton_router_limits():
    inp = _router_inputs(2, 3, 2, 2, 4, 2, torch.float32)
    big = {n: (t[:1].expand(1025, *t.shape[1:]).contiguous() if t.dim() > 1 and t.shape[0] == 2 else t)
           for n, t in inp.items()}
    with pytest.raises(ValueError, match="B <= 1024"):
        _route(big, 1, False, False, "triton")


# ----------------------------------------------------------------------------- GPU: realistic sizes
@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,k", [(1, 48, 256, 256, 1), (8, 96, 64, 72, 2), (3, 192, 33, 47, 1)])
def test_gpu_realistic_sizes(backend, dtype, B, C, H, W, k):
    E, F = 4, 384
    inp = _router_inputs(B, C, H, W, E, F, dtype)
    out = _route(inp, k, True, True, backend)
    out64 = _route(_double(inp), k, True, True, "reference")
    outd = _route(inp, k, True, True, "reference")
    assert torch.equal(out[1], out64[1])
    for i, n in ((0, "gates"), (2, "logits"), (3, "loss")):
        assert_within_rule(out[i], out64[i], outd[i], _atol(out64[i]), n)
    eo, gates, perm = _combine_inputs(B, k, E, (C, H, W), dtype)
    with moce_kernels.backend(backend), poison_outputs():
        comb = ops.moe_combine(eo, gates, perm)
    r64 = ref.combine(eo.double(), gates.double(), perm)
    assert_within_rule(comb, r64, ref.combine(eo, gates, perm), _atol(r64, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST)
def test_gpu_dispatch_many_slots(backend):
    idx = _random_indices(3000, 2, 8, 7)
    with moce_kernels.backend(backend), poison_outputs():
        out = ops.moe_dispatch(idx, 8)
    for a, r in zip(out, ref.dispatch(idx, 8)):
        assert torch.equal(a, r)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST)
def test_gpu_route_dispatch_combine_in_cuda_graph(backend):
    """route -> dispatch -> combine captured once in a CUDA graph, replayed on inputs that route differently."""
    B, C, E, k = 4, 16, 4, 2
    inp = _spread_router(B, C, E, torch.float32)
    rows = torch.randn(B * k, C, 6, 5, device=DEVICE)

    def step():
        g, idx, _, _ = ops.moe_route(inp["x"], inp["freq_emb"], inp["gate_weight"], inp["freq_weight"],
                                     inp["complexity"], inp["noise"], k, 0.25, False, True)
        _, _, p = ops.moe_dispatch(idx, E)
        return idx, ops.moe_combine(rows, g, p)

    with moce_kernels.backend(backend):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            idx_g, out_g = step()
        seen = set()
        for shift in range(3):
            x = 0.1 * torch.randn_like(inp["x"])
            for b in range(B):
                x[b, (b + shift) % (E - 1)] += 3.0
            inp["x"].copy_(x)
            rows.copy_(torch.randn_like(rows))
            graph.replay()
            torch.cuda.synchronize()
            with moce_kernels.backend("reference"):
                idx_r, out_r = step()
            assert torch.equal(idx_g, idx_r)
            torch.testing.assert_close(out_g, out_r, rtol=1e-5, atol=1e-5)
            seen.add(tuple(idx_g[:, 0].tolist()))
        assert len(seen) == 3, "the replays should have routed differently"


@pytest.mark.gpu
@pytest.mark.skipif("cuda" not in FAST, reason="cuda backend unavailable")
def test_gpu_cuda_limits():
    """More than 64 experts is refused by the CUDA kernels with a clear error (no silent fallback)."""
    E = 65
    inp = _router_inputs(2, 3, 2, 2, E, 2, torch.float32, min_gap=0.0)
    with pytest.raises(RuntimeError, match="experts"):
        _route(inp, 1, False, False, "cuda")
    with pytest.raises(RuntimeError, match="num_experts"):
        with moce_kernels.backend("cuda"):
            ops.moe_dispatch(torch.zeros(2, 1, dtype=torch.int64, device=DEVICE), E)


# ----------------------------------------------------------------------------- invalid values
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2])
def test_route_nan_image_gets_valid_experts(backend, k):
    """An image containing NaN makes its logits and scores NaN: every backend still returns experts in
    [0, E), the reference's (NaN ranks first, ties to the lower index: experts 0..k-1), NaN gates, and the
    other images' routing unchanged."""
    inp = _router_inputs(3, 4, 5, 3, 4, 2, torch.float32)
    inp["x"][1, 2, 1, 1] = float("nan")
    g, idx, _, _ = _route(inp, k, False, True, backend)
    g_ref, idx_ref, _, _ = ref.route(*(inp[n] for n in ("x", "freq_emb", "gate_weight", "freq_weight", "complexity",
                                                        "noise")), k, 0.25, False, True)
    assert ((idx >= 0) & (idx < 4)).all(), idx
    assert torch.equal(idx, idx_ref), (idx, idx_ref)
    assert idx[1].tolist() == list(range(k)) and torch.isnan(g[1]).all()
    counts, offsets, perm = ops.moe_dispatch(idx, 4)
    assert offsets[-1].item() == idx.numel()  # every slot lies in some expert's segment


def test_reference_top_k_order():
    nan = float("nan")
    v = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, nan, 2.0, nan], [nan] * 4, [3.0, 1.0, 2.0, 0.0]])
    assert ref.top_k(v, 2)[1].tolist() == [[0, 1], [1, 3], [0, 1], [0, 2]]


def test_scale_arguments_must_be_positive():
    inp = _router_inputs(2, 3, 4, 4, 4, 2, torch.float32)
    args = [inp[n] for n in ("x", "freq_emb", "gate_weight", "freq_weight", "complexity", "noise")]
    for bad in (0.0, -0.25, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_std must be a finite number > 0"):
            ops.moe_route(*args, 1, bad, True, True)
    q = torch.randn(1, 2, 4, 4, device=DEVICE)
    w, b = torch.ones(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    for bad in (0.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            ops.window_fft_attention(q, q, q, 4, w, b, bad)


def test_debug_checks_catch_invalid_routing_tables(monkeypatch):
    """Cheap checks (shape, dtype, device) always; value checks that read the device under
    MOCE_DEBUG_CHECKS=1, and without it the invalid tables are not read on the host."""
    eo, gates, perm = _combine_inputs(2, 2, 4, (2, 2, 2), torch.float32)
    with pytest.raises(TypeError, match="perm has dtype"):
        ops.moe_combine(eo, gates, perm.to(torch.int32))
    bad_perm = perm.clone()
    bad_perm[0] = bad_perm[1]
    bad_idx = torch.tensor([[0], [4]], dtype=torch.int64, device=DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    offsets = torch.tensor([0, 1, 1, 1, 2], dtype=torch.int64, device=DEVICE)
    ws = make_weights(4, (1, 1, 1, 1), torch.float32)
    with torch.no_grad():
        ops.moe_combine(eo, gates, bad_perm)  # no debug checks: runs (row 0 read twice), no host read
    monkeypatch.setattr(moce_kernels.settings.SETTINGS, "debug_checks", True)
    with pytest.raises(ValueError, match="perm is not a permutation"):
        ops.moe_combine(eo, gates, bad_perm)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        ops.moe_dispatch(bad_idx, 4)
    with pytest.raises(ValueError, match="offsets must rise from 0 to 2"):
        ops.moe_experts(x, x, torch.arange(2, device=DEVICE), offsets.flip(0), 1, ws, [4] * 4, [1] * 4)
    with pytest.raises(ValueError, match="perm is not a permutation"):
        ops.moe_experts(x, x, torch.zeros(2, dtype=torch.int64, device=DEVICE), offsets, 1, ws, [4] * 4, [1] * 4)
    ops.moe_experts(x, x, torch.arange(2, device=DEVICE), offsets, 1, ws, [4] * 4, [1] * 4)  # valid: runs

