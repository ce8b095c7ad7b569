"""Tiled, memory-bounded restoration of images of any size: :func:`restore`.

Tiles. An image whose pixels fit one forward's memory budget runs whole. A larger one is cut into
overlapping tiles sized to it (:func:`plan_tiles`): of all the grids whose tiles fit the budget
(and the ``tile`` cap, if one is given), the one that runs the fewest pixels (as even as the model's
padding unit allows; ties: fewer tiles), so the tiles cost only their overlaps, not a fixed square
side clipped to the image. The tiles run through the model in batches, and their outputs are
blended with smooth weights that sum to one at every pixel (a raised-cosine ramp across each
overlap, separable in y and x), accumulated in float64 so that where all tiles agree the result is
exactly their output.

Routing. MoCE-IR picks each MoCE layer's experts and gates per *image*, from the mean of that
layer's features over the image. Run tile by tile, every tile would pick its own experts
(``routing="tile"``), and neighbouring tiles that disagree can leave a seam. ``routing="image"``
(the default) decides the route once per image and runs every tile with it
(:mod:`moce_kernels.model.fixed_routing`): a *routing pass* runs the model on up to
:data:`MAX_ROUTE_CROPS` crops of up to :data:`ROUTE_CROP` x :data:`ROUTE_CROP` pixels spread evenly
over the image, at full resolution, with every MoCE layer routing the crops together from their mean
router input (the mean of their router logits: the route of the crops seen as one image, each
layer given the previous layers' shared routes). The crops hold at most :data:`ROUTE_SHARE` of the
image's pixels (at least one crop, smaller than 128 px where that share is smaller). Full-resolution
crops rather than a downscaled whole image, because the router tells degradations apart by their
statistics at the pixel scale (noise level, rain streaks, blur width), which downscaling changes;
128 px is the patch size the released models were trained on.
An image that fits in one tile is never tiled: both modes then equal ``model(image)``.

Cost. :func:`pixel_ratio` gives a plan's work (the pixels of its tiles and its routing pass, padded
as the model pads them) over the image's pixels; with the automatic tiles and the default overlap it
is at most 1.3 for every image larger than one tile at budgets of 150 k pixels and more (the
presets' CPU budgets are 179 k and 268 k; ``tests/test_restore.py`` counts it over many sizes).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .model.fixed_routing import Routes, cat_routes, fixed_routes, moce_layers, record_routes

ROUTINGS = ("image", "tile")
ROUTE_CROP = 128  # side of the routing pass's crops: the released models' training patch size
MAX_ROUTE_CROPS = 16
ROUTE_SHARE = 0.08  # the routing pass's pixels, at most this share of the image's
MIN_TILE = 32  # out-of-memory halving stops once tiles of MIN_TILE x MIN_TILE pixels fail
RANGE_TOLERANCE = 1e-3  # input values within this of [0, 1] are accepted (rounding in float conversions)
CPU_ACTIVATION_BUDGET = 1 << 30  # bytes of activations per forward on CPU
GPU_MEMORY_FRACTION = 0.6  # of the free memory, for activations per forward on a GPU
# Peak bytes of an eval forward per pixel and per unit of `dim`: measured on CPU in fp32 for MoCE-IR-S
# (~1.0 GB above the baseline for one 512 x 512 image at dim 32); also used, conservatively, for 16-bit dtypes.
BYTES_PER_PIXEL_PER_DIM = 125
DEFAULT_DIM = 48  # for models that do not say their width

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


# ---------------------------------------------------------------- tile plan and blending weights
def axis_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start of each tile along an axis of ``size``: evenly spread, neighbours overlapping by >= overlap."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(overlap: int) -> torch.Tensor:
    """Raised cosine rising over ``overlap`` pixels, in (0, 1); ramp[i] + ramp[overlap - 1 - i] == 1."""
    i = torch.arange(overlap, dtype=torch.float64)
    return 0.5 - 0.5 * torch.cos(math.pi * (i + 0.5) / overlap)


def axis_weights(size: int, starts: Sequence[int], length: int, overlap: int) -> List[torch.Tensor]:
    """Per tile, its (length,) float64 blending weights along the axis; they sum to one at every pixel.

    Each tile's raw weight is 1 inside and ramps down over ``overlap`` pixels towards each edge
    that lies inside the image; the raw weights are then divided by their sum over the tiles.
    """
    raw = []
    for s in starts:
        w = torch.ones(length, dtype=torch.float64)
        if overlap > 0 and s > 0:
            w[:overlap] *= _ramp(overlap)
        if overlap > 0 and s + length < size:
            w[length - overlap:] *= _ramp(overlap).flip(0)
        raw.append(w)
    total = torch.zeros(size, dtype=torch.float64)
    for s, w in zip(starts, raw):
        total[s:s + length] += w
    return [w / total[s:s + length] for s, w in zip(starts, raw)]


@dataclass(frozen=True)
class TilePlan:
    """Tiles of tile_h x tile_w at every (y, x) in ys x xs over a height x width image."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: Tuple[int, ...]
    xs: Tuple[int, ...]
    overlap: int
    multiple: int = 1  # the model's padding unit: tiles run padded to multiples of it

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def weights(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Blending weights per tile row (tile_h,) and per tile column (tile_w,); the weight of tile
        (i, j) is their outer product, and these sum to one at every pixel."""
        return (axis_weights(self.height, self.ys, self.tile_h, self.overlap),
                axis_weights(self.width, self.xs, self.tile_w, self.overlap))


    @property
    def pixels(self) -> int:
        """Pixels the tiles' forwards run, each tile padded to a multiple of ``multiple`` as the model pads it."""
        return self.count * _padded(self.tile_h, self.multiple) * _padded(self.tile_w, self.multiple)


def _padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def _axis_tile(size: int, n: int, overlap: int, multiple: int) -> int:
    """Length of ``n`` tiles covering ``size`` with neighbours overlapping by >= overlap, rounded up to
    ``multiple`` (the whole axis for n = 1)."""
    if n == 1:
        return size
    return _padded(-(-(size + (n - 1) * overlap) // n), multiple)


def _fewest_tiles(size: int, cap: int, overlap: int, multiple: int) -> Optional[int]:
    """The tile length of the fewest tiles of at most ``cap`` covering ``size``; None when none fits."""
    if size <= cap:
        return size
    cap = cap // multiple * multiple
    if cap <= overlap or cap < 2 * overlap:
        return None
    n = -(-(size - overlap) // (cap - overlap))
    return min(_axis_tile(size, n, overlap, multiple), cap)


def _axis_lengths(size: int, overlap: int, multiple: int) -> Iterator[int]:
    """The tile lengths worth trying along an axis, longest first: the whole axis, then those of 2, 3, ...
    tiles, while a tile stays longer than twice the overlap."""
    last = size
    yield size
    for n in range(2, size + 1):
        t = _axis_tile(size, n, overlap, multiple)
        if t >= last:
            continue
        if t < 2 * overlap or t <= overlap:
            return
        last = t
        yield t


def _plan(height: int, width: int, tile_h: int, tile_w: int, overlap: int, multiple: int) -> TilePlan:
    return TilePlan(height, width, tile_h, tile_w, tuple(axis_starts(height, tile_h, overlap)),
                    tuple(axis_starts(width, tile_w, overlap)), overlap, multiple)


def plan_tiles(height: int, width: int, tile: Optional[int], overlap: int, max_pixels: Optional[int] = None,
               multiple: int = 1) -> TilePlan:
    """The overlapping tiles of a height x width image that run the fewest pixels.

    Tiles are at most ``tile`` a side (None: no cap) and ``max_pixels`` in area (None: tile**2), a
    multiple of ``multiple`` on every axis they split (an axis they span whole keeps its length), with
    neighbours overlapping by at least ``overlap``; among the grids that fit, the one whose tiles hold
    the fewest (padded) pixels, ties to fewer tiles. An image that fits one tile is one tile.
    """
    side = tile if tile is not None else max(height, width)
    area = max_pixels if max_pixels is not None else side * side
    best: Optional[TilePlan] = None
    for th in _axis_lengths(height, overlap, multiple):
        if th > side:
            continue
        tw = _fewest_tiles(width, min(side, area // th), overlap, multiple)
        if tw is None:
            continue
        plan = _plan(height, width, th, tw, overlap, multiple)
        if best is None or (plan.pixels, plan.count) < (best.pixels, best.count):
            best = plan
    if best is None:  # nothing fits the caps with this overlap: the largest square within them
        t = max(multiple, min(side, math.isqrt(area)) // multiple * multiple)
        best = _plan(height, width, min(t, height), min(t, width), min(overlap, t // 2), multiple)
    return best


# ---------------------------------------------------------------- model facts and memory budget
@dataclass(frozen=True)
class _ModelInfo:
    device: torch.device
    dtype: torch.dtype
    channels: int
    pad_multiple: int
    dim: int

    @classmethod
    def of(cls, model: nn.Module) -> "_ModelInfo":
        p = next((p for p in model.parameters() if p.is_floating_point()), None)
        core = next((m for m in model.modules() if hasattr(m, "pad_multiple")), None)
        config = getattr(core, "config", {}) or {}
        return cls(device=p.device if p is not None else torch.device("cpu"),
                   dtype=p.dtype if p is not None else torch.float32,
                   channels=int(getattr(core, "inp_channels", 3)), pad_multiple=int(getattr(core, "pad_multiple", 1)),
                   dim=int(config.get("dim", DEFAULT_DIM)))


def activation_budget(info: _ModelInfo) -> int:
    """Pixels one forward may take: from free GPU memory on CUDA, from a fixed budget on CPU."""
    if info.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(info.device)
        budget = free * GPU_MEMORY_FRACTION
    else:
        budget = CPU_ACTIVATION_BUDGET
    return max(1, int(budget // (BYTES_PER_PIXEL_PER_DIM * info.dim)))


@dataclass(frozen=True)
class _Settings:
    side: Optional[int]  # tiles at most this a side; None: only the area bounds them
    area: int  # tiles at most this many pixels
    overlap: int
    max_pixels: int  # per forward
    batch: Optional[int]  # tiles per forward; None: as many as max_pixels allows

    def plan(self, height: int, width: int, multiple: int) -> TilePlan:
        return plan_tiles(height, width, self.side, self.overlap, self.area, multiple)

    def batch_for(self, plan: TilePlan) -> int:
        return self.batch or max(1, self.max_pixels // (plan.tile_h * plan.tile_w))

    def halved(self, plan: TilePlan) -> "_Settings":
        """After an out-of-memory error: half the tiles per forward, or else half the tile area."""
        batch = self.batch_for(plan)
        pixels = max(1, batch * plan.tile_h * plan.tile_w // 2)
        if batch > 1:
            return replace(self, batch=batch // 2, max_pixels=pixels)
        area = plan.tile_h * plan.tile_w // 2
        if plan.tile_h * plan.tile_w <= MIN_TILE * MIN_TILE:
            raise _OOM(f"out of memory even with {plan.tile_h} x {plan.tile_w} tiles one at a time")
        return replace(self, area=area, overlap=min(self.overlap, math.isqrt(area) // 2), max_pixels=pixels,
                       batch=None)


def _settings(info: _ModelInfo, height: int, width: int, tile: Optional[int], overlap: int,
              tile_batch: Optional[int]) -> _Settings:
    max_pixels = activation_budget(info)
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 0):
        raise ValueError(f"tile must be a non-negative int (0: the whole image at once), got {tile!r}")
    if tile is not None and 0 < tile < max(height, width) and tile % info.pad_multiple:
        m = info.pad_multiple
        raise ValueError(f"tile must be a multiple of {m} for this model (it halves the size {m.bit_length() - 1} "
                         f"times), got {tile}; try {max(m, tile // m * m)}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or (tile and 2 * overlap > tile):
        bound = f"[0, tile/2] = [0, {tile // 2}]" if tile else ">= 0"
        raise ValueError(f"overlap must be an int in {bound}, got {overlap!r}")
    if tile_batch is not None and (isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1):
        raise ValueError(f"tile_batch must be a positive int, got {tile_batch!r}")
    if tile is None:
        side, area = None, max_pixels
    else:
        side = tile or max(height, width)  # 0: the whole image, whatever the overlap
        area = side * side
    return _Settings(side=side, area=area, overlap=overlap, max_pixels=max_pixels, batch=tile_batch)


# ---------------------------------------------------------------- input checks
def _shortest(value: float, dtype: torch.dtype) -> str:
    """The fewest digits that give back ``value`` in ``dtype`` (1.0000001 in float32 shows as such, not as 1)."""
    for digits in range(1, 18):
        text = f"{value:.{digits}g}"
        if torch.tensor(float(text), dtype=dtype).item() == value:
            return text
    return repr(value)


def _check_image(image: torch.Tensor, info: _ModelInfo) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"restore expects a torch.Tensor (B, {info.channels}, H, W), got {type(image).__name__}")
    if image.dim() != 4 or image.shape[1] != info.channels:
        raise ValueError(f"restore expects a (B, {info.channels}, H, W) tensor (RGB, channels first), "
                         f"got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"restore expects a floating-point image in [0, 1], got {image.dtype} "
                        "(for 8-bit data: image.float() / 255)")
    if image.numel() == 0:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    lo, hi = (v.item() for v in torch.aminmax(image))  # one host sync per call, before any tile runs
    if not (-RANGE_TOLERANCE <= lo and hi <= 1.0 + RANGE_TOLERANCE):  # False for NaN too
        raise ValueError(f"restore expects values in [0, 1] (within {RANGE_TOLERANCE:g}), got min "
                         f"{_shortest(lo, image.dtype)} and max {_shortest(hi, image.dtype)}"
                         + (" (NaN present)" if math.isnan(lo) or math.isnan(hi) else ""))


# ---------------------------------------------------------------- routing pass and tile pass
def _spread(size: int, length: int, n: int) -> List[int]:
    if n == 1:
        return [(size - length) // 2]
    return sorted({round(i * (size - length) / (n - 1)) for i in range(n)})


def route_crop_boxes(height: int, width: int, plan: TilePlan,
                     max_pixels: int) -> Tuple[int, int, List[Tuple[int, int]]]:
    """(crop height, crop width, crop corners) of the routing pass, on a grid shaped like the image.

    Up to MAX_ROUTE_CROPS crops of ROUTE_CROP pixels a side, as many as ROUTE_SHARE of the image's
    pixels hold (at least one, smaller where one 128 px crop is more than that share), clipped to
    the plan's tiles (so that they fit one forward) and within ``max_pixels``.
    """
    m = plan.multiple
    share = int(ROUTE_SHARE * height * width)
    side = min(ROUTE_CROP, max(m, math.isqrt(share) // m * m))
    ch, cw = min(side, plan.tile_h, height), min(side, plan.tile_w, width)
    n = max(1, min(MAX_ROUTE_CROPS, share // (_padded(ch, m) * _padded(cw, m)), max_pixels // (ch * cw)))
    gy = max(1, min(n, round(math.sqrt(n * height / width))))
    gx = max(1, n // gy)
    return ch, cw, [(y, x) for y in _spread(height, ch, gy) for x in _spread(width, cw, gx)]


def _work(height: int, width: int, plan: TilePlan, max_pixels: int, routed: bool) -> int:
    """Pixels one image's run computes (padded as the model pads them): its tiles, and its routing pass
    when ``routed`` and the image has more than one tile."""
    work = plan.pixels
    if routed and plan.count > 1:
        ch, cw, boxes = route_crop_boxes(height, width, plan, max_pixels)
        work += len(boxes) * _padded(ch, plan.multiple) * _padded(cw, plan.multiple)
    return work


def pixel_ratio(model: nn.Module, height: int, width: int, *, tile: Optional[int] = None, overlap: int = 32,
                routing: str = "image") -> float:
    """The work of ``restore(model, image, tile=tile, overlap=overlap, routing=routing)`` on a
    height x width image, over the image's pixels: its tiles' pixels plus its routing pass's (each
    forward's input padded as the model pads it), with the memory budget of the model's device now
    (before any out-of-memory halving). 1.0 (or a little over, for padding) for an image in one tile."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    info = _ModelInfo.of(model)
    settings = _settings(info, height, width, tile, overlap, None)
    plan = settings.plan(height, width, info.pad_multiple)
    routed = routing == "image" and bool(moce_layers(model))
    return _work(height, width, plan, settings.max_pixels, routed) / (height * width)


def _image_routes(model: nn.Module, image: torch.Tensor, info: _ModelInfo, plan: TilePlan, max_pixels: int) -> Routes:
    """Each image's route per MoCE layer (entries in image order), from its routing pass (module docstring)."""
    ch, cw, boxes = route_crop_boxes(image.shape[2], image.shape[3], plan, max_pixels)
    groups = torch.zeros(len(boxes), dtype=torch.int64, device=info.device)
    parts = []
    for b in range(image.shape[0]):
        crops = torch.stack([image[b, :, y:y + ch, x:x + cw] for y, x in boxes]).to(info.device, info.dtype)
        with record_routes(model, groups, 1) as routes:
            model(crops)
        parts.append(dict(routes))
    return cat_routes(parts)


def _run_tiles(model: nn.Module, image: torch.Tensor, info: _ModelInfo, plan: TilePlan, batch: int,
               routes: Optional[Routes], bar) -> torch.Tensor:
    """The blended output of every tile of ``plan`` (routes: per image, or None for the model's own)."""
    th, tw = plan.tile_h, plan.tile_w
    wy, wx = ([w.to(image.device) for w in ws] for ws in plan.weights())
    acc = torch.zeros(image.shape, dtype=torch.float64, device=image.device)
    jobs = [(b, i, j) for b in range(image.shape[0]) for i in range(len(plan.ys)) for j in range(len(plan.xs))]
    rows = torch.tensor([b for b, _, _ in jobs], dtype=torch.int64, device=info.device)  # tile -> its image
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        x = torch.stack([image[b, :, plan.ys[i]:plan.ys[i] + th, plan.xs[j]:plan.xs[j] + tw] for b, i, j in chunk])
        x = x.to(info.device, info.dtype)
        if routes is None:
            y = model(x)
        else:
            with fixed_routes(model, routes, rows[start:start + len(chunk)]):
                y = model(x)
        if y.shape != x.shape:
            raise ValueError(f"restore needs a model whose output has its input's shape; {tuple(x.shape)} gave "
                             f"{tuple(y.shape)}")
        y = y.to(acc.device, torch.float64)
        for n, (b, i, j) in enumerate(chunk):
            acc[b, :, plan.ys[i]:plan.ys[i] + th, plan.xs[j]:plan.xs[j] + tw] += y[n] * (wy[i][:, None] * wx[j])
        if bar is not None:
            bar.update(len(chunk))
    return acc.to(image.dtype)


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=0, unit="tile", desc="tiles", leave=False)


def restore(model: nn.Module, image: torch.Tensor, *, tile: Optional[int] = None, overlap: int = 32,
            routing: str = "image", progress: bool = False, tile_batch: Optional[int] = None) -> torch.Tensor:
    """Restore ``image`` ((B, 3, H, W), RGB in [0, 1], any size) with ``model``; returns the same shape
    and dtype, on the image's device (the model's values, not clipped to [0, 1]).

    Args:
        model: a MoCEIR (or any module mapping (N, 3, h, w) to the same shape), in eval mode. It runs
            on its own device and dtype; ``image`` may stay elsewhere (e.g. on the host for a large
            image and a GPU model): tiles are moved to the model and blended where the image is.
        tile: the longest tile side in pixels (tiles at most tile x tile), a multiple of the model's
            padding unit (8 for 4 levels). ``None``: tiles within the memory budget (GPU: a share of
            the free memory; CPU: about 1 GiB of activations, e.g. 268 k pixels for MoCE-IR-S);
            ``0``: the whole image at once (any size, any overlap). Either way the tiles are sized to
            the image: the fewest pixels within those bounds (module docstring, :func:`pixel_ratio`).
        overlap: minimum overlap of neighbouring tiles, in pixels (<= tile / 2), blended smoothly.
        routing: ``"image"``: every tile runs with its image's route (module docstring), ``"tile"``:
            every tile routes on its own. The same for models without MoCE layers and for images
            that fit in one tile.
        progress: show a tqdm bar over the tiles.
        tile_batch: tiles per forward; ``None``: as many as the memory budget allows.

    On out-of-memory (``torch.OutOfMemoryError``) the tiles per forward, else the tile area, are
    halved and the image is run again (a ``RuntimeWarning`` says so); the run fails only when
    tiles of 32 x 32 pixels or fewer fail one at a time. Runs under ``torch.no_grad()``. The forwards
    issue no host synchronisation of their own (routes are device tensors); the range check of the
    input synchronises once. Threads may share one model: routes are per thread.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    info = _ModelInfo.of(model)
    _check_image(image, info)
    if model.training:
        warnings.warn("restore() runs the model in training mode (routing noise, batch statistics); "
                      "call model.eval() first", RuntimeWarning, stacklevel=2)
    height, width = image.shape[2], image.shape[3]
    settings = _settings(info, height, width, tile, overlap, tile_batch)
    per_image = routing == "image" and bool(moce_layers(model))
    routes: Optional[Routes] = None
    bar = _progress_bar(progress)
    try:
        with torch.no_grad():
            while True:
                plan = settings.plan(height, width, info.pad_multiple)
                if bar is not None:
                    bar.reset(total=plan.count * image.shape[0])
                batch = settings.batch_for(plan)
                try:
                    if per_image and plan.count > 1 and routes is None:
                        routes = _image_routes(model, image, info, plan, settings.max_pixels)
                    return _run_tiles(model, image, info, plan, batch, routes if plan.count > 1 else None, bar)
                except _OOM:
                    pass  # leave the except block first: its traceback holds the failed forward's tensors
                settings = settings.halved(plan)
                if info.device.type == "cuda":
                    torch.cuda.empty_cache()
                warnings.warn(f"out of memory with {plan.tile_h} x {plan.tile_w} tiles, {batch} per forward; "
                              "continuing with half as many tiles per forward, or else tiles of half the area",
                              RuntimeWarning, stacklevel=2)
    finally:
        if bar is not None:
            bar.close()
