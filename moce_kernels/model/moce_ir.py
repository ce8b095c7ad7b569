"""MoCE-IR: the 4-level asymmetric U-Net with mixture-of-complexity-experts decoders."""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import allocator
from ..nvtx import annotate
from . import fixed_routing
from .blocks import DecoderResidualGroup, EncoderResidualGroup
from .fixed_routing import Route, Routes
from .layers import Downsample, FFTAttention, FrequencyEmbedding, OverlapPatchEmbed, Upsample
from .moe import AdapterLayer, ExpertUsage, expert_depths
from .presets import preset_config


def _pad_reflect(x: torch.Tensor, mult: int) -> torch.Tensor:
    """Pad the bottom/right of x to multiples of ``mult``: reflect, repeated for sides shorter than the pad."""
    for dim in (-1, -2):
        need = (-x.shape[dim]) % mult
        while need > 0:
            size = x.shape[dim]
            step = min(need, size - 1) if size > 1 else need
            pad = (0, step, 0, 0) if dim == -1 else (0, 0, 0, step)
            x = F.pad(x, pad, mode="reflect" if size > 1 else "replicate")
            need -= step
    return x


def _constructor_config(values: Mapping[str, Any]) -> Dict[str, Any]:
    """The constructor's arguments from its local variables, JSON-ready (lists, no classes)."""
    names = [n for n in inspect.signature(MoCEIR.__init__).parameters if n != "self"]
    cfg = {n: list(values[n]) if isinstance(values[n], tuple) else values[n] for n in names}
    cfg["expert_layer"] = None  # FFTAttention, the only expert layer, is the default
    return cfg


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: Optional[int], why: str = "") -> int:
    """``value`` as an int, refused (naming ``name``) unless it is an integer >= ``minimum`` (if given)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} = {value} must be >= {minimum}{why}")
    return int(value)


def _check_list(name: str, value: Any, n: int, minimum: Optional[int], why: str = "") -> List[int]:
    """``value`` as a list of ``n`` integers >= ``minimum`` (one per level or decoder stage)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of {n} integers, got {value!r} ({type(value).__name__})")
    if len(value) != n:
        raise ValueError(f"{name} must have {n} entries for this number of levels, got {list(value)}")
    return [_check_int(f"{name}[{i}]", v, minimum, why) for i, v in enumerate(value)]


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def _check_widths(dim: int, heads: Sequence[int]) -> None:
    """Level i is ``dim * 2**i`` channels wide and splits them over ``heads[i]`` attention heads."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ValueError(f"dim must be an even integer >= 2 (each encoder level halves its width before "
                         f"PixelUnshuffle(2)), got {dim!r}")
    for i, h in enumerate(heads):
        width = dim * 2 ** i
        if isinstance(h, bool) or not isinstance(h, int) or h < 1 or width % h:
            raise ValueError(f"heads[{i}] = {h!r} must be a positive divisor of level {i}'s width "
                             f"dim * 2**{i} = {width}")


def _check_channels(inp_channels: Any, out_channels: Any) -> None:
    """The output is ``output_conv(features) + input`` (the authors' global residual): as many
    channels out as in."""
    _check_int("inp_channels", inp_channels, 1)
    _check_int("out_channels", out_channels, 1)
    if out_channels != inp_channels:
        raise ValueError(f"out_channels = {out_channels} must equal inp_channels = {inp_channels}: the model "
                         "adds its input to its output (a global residual), so it keeps the number of channels")


def _check_expansion(dim: int, factor: Any) -> None:
    """The feed-forward layers are ``int(width * ffn_expansion_factor)`` channels wide (>= 1)."""
    if not isinstance(factor, numbers.Real) or isinstance(factor, bool):
        raise TypeError(f"ffn_expansion_factor must be a number, got {factor!r} ({type(factor).__name__})")
    if not math.isfinite(factor) or int(dim * factor) < 1:
        raise ValueError(f"ffn_expansion_factor = {factor} must be finite and give the feed-forward layers at "
                         f"least one channel (int(dim * factor) = int({dim} * {factor}) >= 1)")


def _check_expert_depths(depth_type: Any, stage_depth: Sequence[int], num_experts: int) -> None:
    """Every expert of every decoder stage chains at least one step."""
    if _is_int(depth_type):
        _check_int("depth_type", depth_type, 1, " (the depth of every expert)")
        return
    for i, d in enumerate(stage_depth):
        depths = expert_depths(depth_type, d, num_experts)
        if min(depths) < 1:
            raise ValueError(f"stage_depth[{i}] = {d} with depth_type {depth_type!r} gives expert depths {depths}; "
                             "every depth must be >= 1")


def _check_arguments(a: Mapping[str, Any]) -> Dict[str, Any]:
    """The constructor's arguments ``a`` checked before anything is built (each error names its
    argument); returns the per-level lists as lists."""
    if a["expert_layer"] not in (None, FFTAttention) and getattr(a["expert_layer"], "__name__", "") != "FFTAttention":
        raise ValueError(f"only the FFTAttention expert layer is supported, got {a['expert_layer']!r}")
    _check_channels(a["inp_channels"], a["out_channels"])
    levels = _check_int("levels", a["levels"], 2)
    one = " (every level and decoder stage needs a block)"
    lists = dict(heads=_check_list("heads", a["heads"], levels, 1),
                 num_blocks=_check_list("num_blocks", a["num_blocks"], levels, 1, one),
                 num_dec_blocks=_check_list("num_dec_blocks", a["num_dec_blocks"], levels - 1, 1, one),
                 stage_depth=_check_list("stage_depth", a["stage_depth"], levels - 1, None))
    _check_widths(a["dim"], lists["heads"])
    _check_expansion(a["dim"], a["ffn_expansion_factor"])
    _check_int("num_refinement_blocks", a["num_refinement_blocks"], 0)
    _check_int("rank", a["rank"], 1)
    num_experts = _check_int("num_experts", a["num_experts"], 1)
    if _check_int("topk", a["topk"], 1) > num_experts:
        raise ValueError(f"topk = {a['topk']} must be <= num_experts = {num_experts}")
    _check_expert_depths(a["depth_type"], lists["stage_depth"], num_experts)
    _check_bool("bias", a["bias"])
    _check_bool("with_complexity", a["with_complexity"])
    return lists


class MoCEIR(nn.Module):
    """MoCE-IR (Zamfir et al., CVPR 2025), exact to the authors' released weights.

    Takes the authors' constructor arguments with their defaults, plus ``routing_noise``
    (``"train"``: router noise only in training; ``"always"``: the authors' behaviour; ``"never"``).
    Input (B, inp_channels, H, W), any H, W (reflect-padded to a multiple of 2**(levels-1) and cropped
    back); output the same shape. After a training forward ``total_loss`` is the auxiliary loss.
    """

    def __init__(self, inp_channels: int = 3, out_channels: int = 3, dim: int = 32, levels: int = 4,
                 heads: Sequence[int] = (1, 1, 1, 1), num_blocks: Sequence[int] = (1, 1, 1, 3),
                 num_dec_blocks: Sequence[int] = (1, 1, 1), ffn_expansion_factor: float = 2,
                 num_refinement_blocks: int = 1, LayerNorm_type: str = "WithBias", bias: bool = False,  # noqa: N803
                 rank: int = 2, num_experts: int = 4, depth_type: Union[str, int] = "lin",
                 stage_depth: Sequence[int] = (3, 2, 1), rank_type: str = "constant", topk: int = 1,
                 expert_layer: Optional[type] = None, with_complexity: bool = False, complexity_scale: str = "max",
                 routing_noise: str = "train"):
        lists = _check_arguments(locals())
        super().__init__()
        heads, num_blocks = lists["heads"], lists["num_blocks"]
        num_dec_blocks, stage_depth = lists["num_dec_blocks"], lists["stage_depth"]
        self.levels = levels
        self.num_dec_blocks = num_dec_blocks
        self.pad_multiple = 2 ** (levels - 1)
        self.inp_channels = inp_channels
        dims = [dim * 2 ** i for i in range(levels)]

        self.patch_embed = OverlapPatchEmbed(inp_channels, dim, bias=False)
        self.freq_embed = FrequencyEmbedding(dims[-1])
        group = dict(ffn_expansion=ffn_expansion_factor, layer_norm_type=LayerNorm_type, bias=True)
        self.enc = nn.ModuleList([
            nn.ModuleList([EncoderResidualGroup(dims[i], heads[i], num_blocks[i], **group), Downsample(dims[i])])
            for i in range(levels - 1)])
        self.latent = EncoderResidualGroup(dims[-1], heads[-1], num_blocks[-1], **group)

        rdims, rheads, rdec = dims[::-1], heads[::-1], num_dec_blocks[::-1]
        block = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias, layer_norm_type=LayerNorm_type, rank=rank,
                     num_experts=num_experts, top_k=topk, depth_type=depth_type, rank_type=rank_type,
                     freq_dim=dims[-1], with_complexity=with_complexity, complexity_scale=complexity_scale,
                     routing_noise=routing_noise)
        self.dec = nn.ModuleList([
            nn.ModuleList([
                Upsample(rdims[i]),
                nn.Conv2d(rdims[i], rdims[i + 1], kernel_size=1, bias=bias),
                DecoderResidualGroup(rdims[i + 1], rheads[i + 1], rdec[i], stage_depth=stage_depth[i], **block),
            ]) for i in range(levels - 1)])
        self.refinement = EncoderResidualGroup(dim, heads[0], num_refinement_blocks, **group)
        self.output = nn.Conv2d(dim, out_channels, kernel_size=3, padding=1, bias=bias)
        self.total_loss: torch.Tensor = torch.zeros(())
        # the MoCE layers, in forward order: found once, not walked for on every forward
        self._adapters: Tuple[AdapterLayer, ...] = tuple(m for m in self.modules() if isinstance(m, AdapterLayer))
        self.config: Dict[str, Any] = _constructor_config(locals())  # what save_checkpoint stores

    # ------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MoCEIR":
        """``"MoCE_IR"`` (dim 48, 25.4 M parameters) or ``"MoCE_IR_S"`` (dim 32, 11.5 M)."""
        cfg = preset_config(name)
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def from_checkpoint(cls, path, preset: Optional[str] = None, map_location="cpu", strict: bool = True,
                        **kwargs) -> "MoCEIR":
        """Load a ``.safetensors`` file written by :meth:`save_checkpoint` (its stored configuration,
        updated by ``kwargs``), a released Lightning ``.ckpt`` or a plain state dict (``weights_only``);
        see :func:`moce_kernels.model.checkpoint.load_model`."""
        from .checkpoint import load_model
        return load_model(cls, path, preset=preset, map_location=map_location, strict=strict, **kwargs)

    def save_checkpoint(self, path) -> None:
        """Write the weights and the constructor arguments (``self.config``, with the current
        ``routing_noise``) to a ``.safetensors`` file; :meth:`from_checkpoint` needs nothing else to
        rebuild the model."""
        from .checkpoint import save_safetensors
        save_safetensors(self.state_dict(), path, dict(self.config, routing_noise=self.routing_noise))

    # ------------------------------------------------------------ routing noise
    def adapters(self) -> List[AdapterLayer]:
        """The MoCE layers, in forward order."""
        return list(self._adapters)

    @property
    def routing_noise(self) -> str:
        return self.adapters()[0].routing_noise

    @routing_noise.setter
    def routing_noise(self, mode: str) -> None:
        for a in self.adapters():
            a.routing_noise = mode

    # ------------------------------------------------------------ fixed routing
    def record_routes(self, groups: Optional[torch.Tensor] = None,
                      num_groups: Optional[int] = None) -> "contextlib.AbstractContextManager[Routes]":
        """``with model.record_routes() as routes: model(x)`` records each MoCE layer's route
        (gates, indices, logits per image) in this thread's forwards; with ``groups``, rows of a group
        share one route decided from their mean router input. See :mod:`moce_kernels.model.fixed_routing`."""
        return fixed_routing.record_routes(self, groups, num_groups)

    def fixed_routes(self, routes: Mapping[str, Route],
                     rows: Optional[torch.Tensor] = None) -> "contextlib.AbstractContextManager[None]":
        """``with model.fixed_routes(routes, rows): model(x)`` runs every MoCE layer with the given
        routes (row b takes entry ``rows[b]``) instead of its router, in this thread's forwards only;
        sync-free. See :mod:`moce_kernels.model.fixed_routing`."""
        return fixed_routing.fixed_routes(self, routes, rows)

    # ------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"MoCEIR expects a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.inp_channels:
            raise ValueError(f"MoCEIR expects {self.inp_channels} input channels, got {x.shape[1]}")
        p = self.patch_embed.proj.weight
        if x.dtype != p.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the model's {p.dtype}; convert one of them")
        if x.device != p.device:
            raise ValueError(f"input is on {x.device} but the model is on {p.device}")
        if x.numel() == 0:
            raise ValueError(f"input is empty: {tuple(x.shape)}")

    @annotate("MoCEIR")
    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Restore x (B, inp_channels, H, W) -> (B, out_channels, H, W).

        ``labels`` (the degradation ids of the authors' training loop, ``net(degraded, de_id)``) is
        accepted and ignored, as in their model. When gradients are recorded, the experts that got no
        image in this forward end with ``grad None`` (one host synchronisation per step: see
        :class:`moce_kernels.model.moe.ExpertUsage`)."""
        self._check_input(x)
        if not torch.compiler.is_compiling() and allocator.applied() is None and x.device.type == "cpu":
            allocator.keep_cpu_memory()  # once per process: freed activations stay in the heap
        usage = ExpertUsage() if torch.is_grad_enabled() else None
        for adapter in self._adapters:
            adapter.usage = usage
        try:
            return self._forward(x)
        finally:
            for adapter in self._adapters:
                adapter.usage = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        inp = _pad_reflect(x, self.pad_multiple)
        feats = self.patch_embed(inp)
        skips = []
        for group, down in self.enc:
            feats = group(feats)
            skips.append(feats)
            feats = down(feats)
        feats = self.latent(feats)
        freq_emb = self.freq_embed(feats)
        total = feats.new_zeros((), dtype=torch.float32)
        for up, fuse, group in self.dec:
            feats = fuse(torch.cat([up(feats), skips.pop()], dim=1))
            feats = group(feats, freq_emb)
            total = total + group.loss
        feats = self.refinement(feats)
        out = self.output(feats) + inp
        self.total_loss = total / sum(self.num_dec_blocks)
        return out[:, :, :H, :W]
