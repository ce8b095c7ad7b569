"""moce_kernels.restore (tiled restoration) and the model's fixed routing (record / replay routes)."""
import math

import pytest
import torch
import torch.nn as nn

from moce_kernels import MoCEIR, restore
from moce_kernels.model.moe import ROUTE_OVERRIDES, AdapterLayer
from moce_kernels.restoration import (BYTES_PER_PIXEL_PER_DIM, CPU_ACTIVATION_BUDGET, _ModelInfo, activation_budget,
                                      auto_tile, axis_weights, plan_tiles)


class Pointwise(nn.Module):
    """A local stand-in: each output pixel depends on its input pixel only (channel mixing and a
    soft-sign, all elementwise IEEE operations, so a pixel's value is bitwise the same in any tile)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 1, 1))
        self.bias = nn.Parameter(torch.randn(3, 1, 1))
        self.shapes = []
        self.eval()

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        z = self.bias + x[:, 0:1] * self.weight[:, 0] + x[:, 1:2] * self.weight[:, 1] + x[:, 2:3] * self.weight[:, 2]
        return 0.5 + 0.5 * z / (1 + z.abs())


class OutOfMemoryAbove(Pointwise):
    """Raises torch.OutOfMemoryError for forwards of more than ``limit`` pixels (all tiles together)."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def forward(self, x):
        if x.shape[0] * x.shape[2] * x.shape[3] > self.limit:
            raise torch.OutOfMemoryError(f"stand-in: {tuple(x.shape)} is over {self.limit} pixels")
        return super().forward(x)


def tiny_moceir(seed=0, **kw):
    torch.manual_seed(seed)
    return MoCEIR(dim=8, num_blocks=[1, 1, 1, 1], **kw).eval()


def two_halves(height, width, seed):
    """A smooth ramp on the left, noise on the right: content the router tells apart."""
    g = torch.Generator().manual_seed(seed)
    img = torch.linspace(0, 0.5, width).repeat(1, 3, height, 1)
    img[..., width // 2:] = torch.rand(1, 3, height, width - width // 2, generator=g)
    return img


# ---------------------------------------------------------------- blending weights
@pytest.mark.parametrize("size,tile,overlap", [(100, 32, 8), (97, 40, 16), (64, 64, 8), (33, 64, 8), (301, 96, 32),
                                               (50, 24, 0)])
def test_blend_weights_sum_to_one_and_are_smooth(size, tile, overlap):
    plan = plan_tiles(size, size, tile, overlap)
    ws = axis_weights(size, plan.ys, plan.tile_h, overlap)
    total = torch.zeros(size, dtype=torch.float64)
    for s, w in zip(plan.ys, ws):
        assert (w > 0).all()
        total[s:s + plan.tile_h] += w
    assert torch.allclose(total, torch.ones_like(total), rtol=0, atol=1e-12)
    starts = list(plan.ys)
    assert starts[0] == 0 and starts[-1] + plan.tile_h == size
    for a, b in zip(starts, starts[1:]):
        assert a + plan.tile_h - b >= overlap, "neighbours overlap by at least `overlap`"
    if overlap:
        for s, w in zip(plan.ys, ws):  # no jumps: plain averaging would step by 0.5 at a tile edge
            full = torch.zeros(size + 2, dtype=torch.float64)
            full[s + 1:s + 1 + plan.tile_h] = w
            inner = full[1:-1] if s > 0 and s + plan.tile_h < size else full[1 + s:1 + s + plan.tile_h]
            assert inner.diff().abs().max() <= math.pi / overlap
    # 2-D: the outer products sum to one at every pixel of a non-square plan
    plan2 = plan_tiles(size, size // 2 + 1, tile, overlap)
    wy, wx = plan2.weights()
    grid = torch.zeros(plan2.height, plan2.width, dtype=torch.float64)
    for i, y in enumerate(plan2.ys):
        for j, x in enumerate(plan2.xs):
            grid[y:y + plan2.tile_h, x:x + plan2.tile_w] += wy[i][:, None] * wx[j]
    assert torch.allclose(grid, torch.ones_like(grid), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- tiling
@pytest.mark.parametrize("routing", ["image", "tile"])
def test_tiled_equals_untiled_for_a_local_model(routing):
    torch.manual_seed(1)
    model = Pointwise()
    image = torch.rand(2, 3, 61, 75)
    with torch.no_grad():
        expected = model(image)
    model.shapes.clear()
    out = restore(model, image, tile=24, overlap=6, routing=routing, tile_batch=3, progress=True)
    assert len(model.shapes) > 2 and all(s == (3, 3, 24, 24) or s[0] < 3 for s in model.shapes)
    assert torch.equal(out, expected)


def test_out_of_memory_halves_the_tile_and_finishes():
    torch.manual_seed(2)
    model = OutOfMemoryAbove(limit=32 * 32)
    image = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        expected = Pointwise.forward(model, image)
    model.shapes.clear()
    with pytest.warns(RuntimeWarning, match="out of memory"):
        out = restore(model, image, tile=64, overlap=8, tile_batch=4)
    assert torch.equal(out, expected)
    assert set(model.shapes) == {(1, 3, 32, 32)}, "64 px x 4, 2, 1 tiles -> 32 px x 2, 1 tiles"


def test_out_of_memory_at_the_smallest_tile_is_an_error():
    model = OutOfMemoryAbove(limit=0)
    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError, match="even with"):
        restore(model, torch.rand(1, 3, 80, 80), tile=64, overlap=8)


def test_image_fitting_one_tile_is_the_plain_forward():
    model = tiny_moceir()
    image = torch.rand(2, 3, 40, 44)
    with torch.no_grad():
        expected = model(image)
    for routing in ("image", "tile"):
        assert torch.equal(restore(model, image, tile=64, routing=routing), expected)


def _expert_sets(model, image, routing):
    """Per MoCE layer, the distinct expert-index rows route() returned during restore()."""
    seen = {}
    original = AdapterLayer.route

    def spy(layer, x, freq_emb):
        out = original(layer, x, freq_emb)
        seen.setdefault(id(layer), set()).update(tuple(r) for r in out[1].tolist())
        return out

    AdapterLayer.route = spy
    try:
        restore(model, image, tile=32, overlap=8, routing=routing, tile_batch=4)
    finally:
        AdapterLayer.route = original
    return seen


def test_image_routing_gives_every_tile_the_same_experts():
    model = tiny_moceir(seed=0)
    image = two_halves(64, 96, seed=0)
    per_tile = _expert_sets(model, image, "tile")
    assert any(len(s) > 1 for s in per_tile.values()), "the test image must make tiles disagree when routed alone"
    per_image = _expert_sets(model, image, "image")
    assert len(per_image) == len(model.adapters())
    assert all(len(s) == 1 for s in per_image.values()), per_image


def test_bad_inputs_are_named():
    model = Pointwise()
    cases = [(torch.rand(3, 16, 16), ValueError, "B, 3, H, W"), (torch.rand(1, 4, 16, 16), ValueError, "got shape"),
             ((torch.rand(1, 3, 16, 16) * 255).to(torch.uint8), TypeError, "floating-point"),
             (torch.rand(1, 3, 16, 16) + 1, ValueError, r"\[0, 1\]"),
             (torch.full((1, 3, 16, 16), float("nan")), ValueError, "NaN")]
    for image, error, match in cases:
        with pytest.raises(error, match=match):
            restore(model, image)
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="routing"):
        restore(model, image, routing="pixel")
    with pytest.raises(ValueError, match="multiple of 8"):
        restore(tiny_moceir(), image, tile=30)
    with pytest.raises(ValueError, match="overlap"):
        restore(model, image, tile=32, overlap=17)


def test_cpu_default_tile_fits_the_budget():
    info = _ModelInfo(torch.device("cpu"), torch.float32, 3, 8, 32)  # MoCE-IR-S
    tile = auto_tile(info, activation_budget(info))
    bytes_per_pixel = BYTES_PER_PIXEL_PER_DIM * 32
    assert tile % 32 == 0 and tile * tile * bytes_per_pixel <= CPU_ACTIVATION_BUDGET
    assert (tile + 32) ** 2 * bytes_per_pixel > CPU_ACTIVATION_BUDGET, "the largest such tile"


# ---------------------------------------------------------------- fixed routing on the model
def test_recorded_routes_replay_exactly_and_map_rows():
    model = tiny_moceir(seed=3, topk=2)
    x = torch.rand(2, 3, 24, 32)
    with torch.no_grad():
        with model.record_routes() as routes:
            out = model(x)
        assert set(routes) == {n for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
        assert all(r.gates.shape == (2, 2) and r.logits.shape == (2, 4) for r in routes.values())
        with model.fixed_routes(routes):
            assert torch.equal(model(x), out)
        rows = torch.tensor([1, 1, 0])
        with model.fixed_routes(routes, rows=rows):
            swapped = model(x[rows])
    for b, r in enumerate(rows.tolist()):  # each row runs with its image's route: the same output as alone
        assert torch.allclose(swapped[b], out[r], atol=1e-5)


def test_group_routing_is_the_route_of_the_group_mean():
    model = tiny_moceir(seed=4)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        with model.record_routes() as alone:
            model(x)
        with model.record_routes(torch.zeros(2, dtype=torch.int64), 1) as shared:
            model(torch.cat([x, x]))
    for name, route in alone.items():
        assert torch.equal(shared[name].indices, route.indices), name
        assert torch.allclose(shared[name].gates, route.gates, atol=1e-6), name


def test_fixed_routes_reject_what_does_not_fit():
    model = tiny_moceir()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), model.record_routes() as routes:
        model(x)
    with pytest.raises(ValueError, match="missing"):
        with model.fixed_routes(dict(list(routes.items())[1:])):
            pass
    with torch.no_grad(), model.fixed_routes(routes):
        with pytest.raises(ValueError, match="rows="):
            model(torch.rand(3, 3, 16, 16))
        with pytest.raises(RuntimeError, match="do not nest"):
            with model.record_routes():
                pass
    assert not ROUTE_OVERRIDES.active, "the blocks clean up after errors"
    with model.record_routes():
        pass
