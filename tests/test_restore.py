"""moce_kernels.restore (tiled restoration) and the model's fixed routing (record / replay routes)."""
import math

import pytest
import torch
import torch.nn as nn

from moce_kernels import MoCEIR, restore
from moce_kernels.model.moe import ROUTE_OVERRIDES, AdapterLayer
from moce_kernels.restoration import (BYTES_PER_PIXEL_PER_DIM, CPU_ACTIVATION_BUDGET, ROUTE_SHARE, _ModelInfo,
                                      _Settings, _work, activation_budget, axis_weights, pixel_ratio, plan_tiles,
                                      route_crop_boxes)


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
    plan = plan_tiles(61, 75, 24, 6)
    assert max(plan.tile_h, plan.tile_w) <= 24
    assert len(model.shapes) > 2 and all(s == (3, 3, plan.tile_h, plan.tile_w) or s[0] < 3 for s in model.shapes)
    assert torch.equal(out, expected)


def test_out_of_memory_halves_the_tile_and_finishes():
    torch.manual_seed(2)
    model = OutOfMemoryAbove(limit=32 * 32)
    image = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        expected = Pointwise.forward(model, image)
    model.shapes.clear()
    first = plan_tiles(70, 90, 64, 8)
    assert first.tile_h * first.tile_w > 32 * 32, "the first plan's tiles fail even one at a time"
    with pytest.warns(RuntimeWarning, match="out of memory") as caught:
        out = restore(model, image, tile=64, overlap=8, tile_batch=4)
    assert torch.equal(out, expected)
    assert len(caught) == 3, "4, 2, 1 tiles per forward fail, then tiles of half the area fit one at a time"
    (shape,) = set(model.shapes)
    assert shape[0] == 1 and shape[2] * shape[3] <= first.tile_h * first.tile_w // 2


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


def test_cpu_default_tiles_fit_the_budget():
    info = _ModelInfo(torch.device("cpu"), torch.float32, 3, 8, 32)  # MoCE-IR-S
    budget = activation_budget(info)
    bytes_per_pixel = BYTES_PER_PIXEL_PER_DIM * 32
    assert budget * bytes_per_pixel <= CPU_ACTIVATION_BUDGET < (budget + 1) * bytes_per_pixel, "the whole budget"
    for h, w in ((480, 640), (512, 600), (1200, 1600), (333, 4001), (4000, 100)):
        plan = plan_tiles(h, w, None, 32, budget, 8)
        assert plan.tile_h * plan.tile_w <= budget, (h, w)
        assert plan.count > 1 and plan.ys[-1] + plan.tile_h == h and plan.xs[-1] + plan.tile_w == w
        for length, size in ((plan.tile_h, h), (plan.tile_w, w)):
            assert length == size or length % 8 == 0, "split axes are cut in multiples of the padding unit"


# ---------------------------------------------------------------- what tiling costs
def _auto_ratio(h, w, budget):
    settings = _Settings(side=None, area=budget, overlap=32, max_pixels=budget, batch=None)
    plan = settings.plan(h, w, 8)
    return _work(h, w, plan, budget, True) / (h * w), plan


@pytest.mark.parametrize("budget,sizes", [(150_000, range(40, 3100, 53)), (178_956, range(40, 3100, 53)),
                                          (268_435, range(40, 3100, 53)), (1_000_000, range(300, 6000, 97)),
                                          (8_000_000, range(1000, 12000, 181))])  # 178,956 / 268,435 pixels:
def test_automatic_tiles_cost_at_most_1_3x_the_image(budget, sizes):  # the CPU budgets of MoCE-IR / MoCE-IR-S
    """Tiles and routing pass together run at most 1.3x the image's pixels, for every image larger than
    one tile (a deterministic count over a grid of sizes, the default overlap of 32)."""
    checked = 0
    for h in sizes:
        for w in sizes:
            if h * w <= budget:
                continue
            ratio, plan = _auto_ratio(h, w, budget)
            assert plan.count > 1 and ratio <= 1.3, (h, w, plan, ratio)
            checked += 1
    assert checked > 500


def test_routing_pass_is_a_small_share_of_the_image():
    for h, w in ((480, 640), (1200, 1600), (700, 5000), (3000, 3000)):
        _, plan = _auto_ratio(h, w, 268_435)
        ch, cw, boxes = route_crop_boxes(h, w, plan, 268_435)
        assert 1 <= len(boxes) <= 16 and ch <= 128 and cw <= 128
        assert len(boxes) * ch * cw <= ROUTE_SHARE * h * w
        assert all(0 <= y <= h - ch and 0 <= x <= w - cw for y, x in boxes)


def test_pixel_ratio_of_the_presets_at_480_x_640():
    """The photo of the issue: two 480 x 512 tiles and 16 routing crops were 2.45x the image; now one
    row of two tiles sized to the image and one crop."""
    for preset in ("MoCE_IR_S", "MoCE_IR"):
        model = MoCEIR.from_preset(preset).eval()
        ratio = pixel_ratio(model, 480, 640)
        assert 1.0 < ratio <= 1.3, (preset, ratio)
        assert pixel_ratio(model, 480, 640, routing="tile") < ratio
        assert pixel_ratio(model, 96, 120) == 1.0, "one tile: the image itself"
        assert pixel_ratio(model, 100, 120) == 104 / 100, "padded as the model pads it"
        assert pixel_ratio(model, 480, 640, tile=0) == 1.0


# ---------------------------------------------------------------- whole image, input range
def test_tile_0_runs_images_smaller_than_the_overlap():
    model = tiny_moceir()
    for shape in ((1, 3, 20, 30), (2, 3, 7, 63)):
        image = torch.rand(shape)
        with torch.no_grad():
            expected = model(image)
        assert torch.equal(restore(model, image, tile=0), expected), shape


def test_values_a_rounding_step_outside_0_1_are_accepted_and_others_named_exactly():
    model = Pointwise()
    image = torch.rand(1, 3, 16, 16)
    image[0, 0, 0, 0], image[0, 1, 0, 0] = 1.0000001, -1e-7
    with torch.no_grad():
        expected = model(image)
    assert torch.equal(restore(model, image), expected)
    image[0, 0, 0, 0] = 1.01
    with pytest.raises(ValueError, match=r"got min -1e-07 and max 1\.01$"):
        restore(model, image)
    image[0, 0, 0, 0] = 1.0011
    with pytest.raises(ValueError, match=r"max 1\.0011$"):
        restore(model, image)


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
