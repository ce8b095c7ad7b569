"""Behaviour users rely on: batched eval per image, any size, routing noise modes, losses, gradients."""
import pytest
import torch

from moce_kernels import MoCEIR
from moce_kernels.model.moce_ir import _pad_reflect
from moce_kernels.testing import max_err

from _models import FILES, load_data, model_for


@pytest.fixture(params=FILES)
def data(request, reference_dir):
    return load_data(reference_dir, request.param)


def _spread_router(model: MoCEIR) -> None:
    """Make the router depend strongly on the image so that a batch's images take different experts."""
    g = torch.Generator().manual_seed(0)
    for a in model.adapters():
        for w in (a.routing.gate[2].weight, a.routing.freq_gate.weight):
            with torch.no_grad():
                w.copy_(torch.randn(w.shape, generator=g) * 50.0)


def _varied_images(b: int, h: int, w: int) -> torch.Tensor:
    """Images with different brightness and contrast, so that routing differs between them."""
    scale = torch.linspace(0.2, 3.0, b).view(b, 1, 1, 1)
    shift = torch.linspace(-1.0, 1.0, b).view(b, 1, 1, 1)
    return torch.randn(b, 3, h, w) * scale + shift


def _first_choices(model, x):
    chosen = []
    hooks = [a.register_forward_hook(lambda m, inp, out: chosen.append(m.route(inp[0], inp[1])[1].tolist()))
             for a in model.adapters()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return chosen


def test_batched_eval_equals_single_images(data):
    model = model_for(data)
    _spread_router(model)
    x = _varied_images(4, 32, 40)
    routes = _first_choices(model, x)
    assert any(len({tuple(r) for r in layer}) > 1 for layer in routes), "inputs failed to spread the routing"
    with torch.no_grad():
        batched = model(x)
        for b in range(x.shape[0]):
            alone = model(x[b:b + 1])
            assert max_err(batched[b:b + 1], alone) <= 1e-5, f"image {b}"


@pytest.mark.parametrize("hw", [(37, 29), (1, 1), (5, 3), (33, 17), (16, 24)])
def test_any_size_pads_reflect_and_crops(data, hw):
    model = model_for(data)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = model(x)
        assert out.shape == x.shape
        padded = _pad_reflect(x, 8)
        assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
        full = model(padded)
    assert max_err(out, full[..., : hw[0], : hw[1]]) <= 1e-5


def test_pad_reflect_values():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    p = _pad_reflect(x, 8)
    assert p.shape == (1, 1, 8, 8)
    assert torch.equal(p[..., :3, :4], x)
    assert torch.equal(p[0, 0, 0, 4:7], torch.tensor([2.0, 1.0, 0.0]))  # reflect, then reflect again
    assert torch.equal(_pad_reflect(torch.ones(1, 1, 1, 1) * 3, 8), torch.full((1, 1, 8, 8), 3.0))


def test_routing_noise_modes(data):
    x = torch.randn(2, 3, 32, 32)
    model = model_for(data)
    assert model.routing_noise == "train"
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b), "eval must be deterministic with routing_noise='train'"
    model.routing_noise = "always"
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.equal(c, d), "routing_noise='always' samples noise in eval"
    model.train()
    model.routing_noise = "never"
    e, f = model(x), model(x)
    assert torch.equal(e, f)
    assert model.total_loss.item() > 0, "the noise scale still enters the load loss without sampled noise"
    model.routing_noise = "train"
    g, h = model(x), model(x)
    assert not torch.equal(g, h)
    with pytest.raises(ValueError, match="routing_noise"):
        model.routing_noise = "sometimes"
    with pytest.raises(ValueError, match="routing_noise"):
        MoCEIR(**data["config"], routing_noise="bad")


def test_total_loss_train_and_eval(data):
    model = model_for(data).train()
    model(torch.randn(3, 3, 24, 16))
    assert model.total_loss.requires_grad and model.total_loss.item() > 0
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 24, 16))
    assert model.total_loss.item() == 0.0


def test_gradients_reach_every_used_parameter(data):
    model = model_for(data, routing_noise="never").train()
    x = _varied_images(4, 32, 32)
    out = model(x)
    (out.square().mean() + model.total_loss).backward()
    routes = _first_choices(model.eval(), x)
    used = {(a, e) for a, layer in zip(model.adapters(), routes) for row in layer for e in row}
    for name, p in model.named_parameters():
        expert, rank = None, None
        for a in model.adapters():
            for e, mod in enumerate(a.expert_modules()):
                if any(q is p for q in mod.parameters()):
                    expert, rank = (a, e), mod.proj[0].out_channels
        if expert is not None and expert not in used:  # as in the authors' model: not in the graph
            assert p.grad is None, f"{name} belongs to an unused expert but got a gradient"
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        if rank == 1 and (".body.q" in name or "body.norm.body.weight" in name):
            continue  # LayerNorm over one channel is constant (= bias): exact zero gradients
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_topk_and_depth_options():
    for topk in (1, 2, 3, 4):
        m = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1], heads=[1, 1, 1, 1], topk=topk, depth_type="constant",
                   stage_depth=[1, 1, 1], rank_type="spread").eval()
        with torch.no_grad():
            assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3, 16, 16)
    for dt in ("lin", "double", "exp", "fact", 2, "constant"):
        for rt in ("constant", "lin", "double", "exp", "fact", "spread"):
            m = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1], depth_type=dt, rank_type=rt)
            assert len(m.adapters()) == 3
    m = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1], depth_type="lin", stage_depth=[2, 1, 1])
    assert [e.depth for e in m.adapters()[0].expert_modules()] == [2, 3, 4, 5]


def test_depth_chains_the_step():
    from moce_kernels.reference.expert_stage import expert_step
    m = MoCEIR(dim=8, num_blocks=[1, 1, 1, 1], depth_type=2, rank_type="spread").eval()
    layer = m.adapters()[-1]
    x, s = torch.randn(1, 8, 16, 16), torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        got = layer.all_expert_outputs(x, s)[1]
        w = layer.expert_modules()[1].weights()
        want = expert_step(expert_step(x, s, w, 8), s, w, 8)
    assert max_err(got, want) <= 1e-6


def test_bad_inputs_and_arguments(data):
    model = model_for(data)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="dtype"):
        model(torch.randn(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        model(torch.randn(0, 3, 16, 16))
    with pytest.raises(ValueError, match="preset"):
        MoCEIR.from_preset("MoCE_IR_XL")
    with pytest.raises(ValueError, match="heads"):
        MoCEIR(heads=[1, 1])
    with pytest.raises(ValueError, match="rank_type"):
        MoCEIR(rank_type="quadratic")
    with pytest.raises(ValueError, match="depth_type"):
        MoCEIR(depth_type="cubic")
    with pytest.raises(ValueError, match="topk"):
        MoCEIR(topk=5)
    with pytest.raises(ValueError, match="LayerNorm_type"):
        MoCEIR(LayerNorm_type="RMS")


def test_float64_model_matches_float32(data):
    """The model runs in float64 too (used as the tight oracle for kernels)."""
    m32 = model_for(data)
    m64 = model_for(data).double()
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        assert max_err(m32(x), m64(x.double())) <= 1e-4
