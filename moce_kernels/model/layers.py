"""Trunk layers of MoCE-IR (Restormer family). Parameter names follow the authors' modules,
so the released state dicts load unchanged; the computations go through :mod:`moce_kernels.ops`."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .. import ops
from ..nvtx import annotate


def weight_bias(m: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(m.weight, m.bias)``: read from ``m._parameters`` when both are registered parameters there
    (what ``nn.Module.__getattr__`` returns for them, without its two Python calls), else the attributes
    (a parametrization, a buffer, a plain attribute)."""
    p = m._parameters
    if "weight" in p and "bias" in p:
        return p["weight"], p["bias"]
    return m.weight, m.bias


class _WithBias(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class _BiasFree(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class LayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor (biased variance, eps 1e-5).

    ``WithBias``: ``(x - mean) / sqrt(var + eps) * w + b``; ``BiasFree``: ``x / sqrt(var + eps) * w``.
    Reduces along C in place (no NHWC copy), unlike the authors' rearrange-based version.
    """

    eps = 1e-5

    def __init__(self, dim: int, layer_norm_type: str = "WithBias"):
        super().__init__()
        if layer_norm_type not in ("WithBias", "BiasFree"):
            raise ValueError(f"LayerNorm_type must be 'WithBias' or 'BiasFree', got {layer_norm_type!r}")
        self.body = _BiasFree(dim) if layer_norm_type == "BiasFree" else _WithBias(dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.body.weight

    def affine(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(self.weight, self.bias)`` in one call (the body's registered parameters, else its attributes)."""
        body = self._modules["body"]
        p = body._parameters
        if "weight" in p:
            return p["weight"], (p["bias"] if "bias" in p else getattr(body, "bias", None))
        return self.weight, self.bias

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The shift, or None for BiasFree."""
        return getattr(self.body, "bias", None)

    @annotate("LayerNorm")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised tensor itself (the blocks fold the LayerNorm into the convolution after it)."""
        mu = x.mean(1, keepdim=True)
        xc = x - mu
        inv = torch.rsqrt((xc * xc).mean(1, keepdim=True) + self.eps)
        w = self.body.weight[:, None, None]
        if isinstance(self.body, _BiasFree):
            return x * inv * w
        return torch.addcmul(self.body.bias[:, None, None], xc * inv, w)


def _conv1x1(dim_in: int, dim_out: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(dim_in, dim_out, kernel_size=1, bias=bias)


def _dwconv(dim: int, k: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, kernel_size=k, padding=k // 2, groups=dim, bias=bias)


def pw_dw(x: torch.Tensor, pw: nn.Conv2d, dw: nn.Conv2d, norm: Optional[LayerNorm] = None,
          gated: bool = False) -> torch.Tensor:
    """``dw(pw(norm(x)))`` (gated: ``gelu(a) * b`` of its halves) through one fused op."""
    (pw_w, pw_b), (dw_w, dw_b) = weight_bias(pw), weight_bias(dw)
    if norm is None:
        op = ops.pointwise_depthwise_conv_gated if gated else ops.pointwise_depthwise_conv
        return op(x, pw_w, dw_w, pw_b, dw_b)
    op = ops.layer_norm_pointwise_depthwise_conv_gated if gated else ops.layer_norm_pointwise_depthwise_conv
    norm_w, norm_b = norm.affine()
    return op(x, norm_w, norm_b, pw_w, dw_w, pw_b, dw_b, norm.eps)


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                      project_out: nn.Conv2d, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """Transposed attention (per head, softmax of the L2-normalised ``q k^T`` times the temperature, times
    v), then ``project_out`` and ``+ residual``: one op."""
    return ops.channel_attention(q, k, v, temperature, *weight_bias(project_out), residual)


class Attention(nn.Module):
    """MDTA: ``q, k, v = split(dw_3(pw(x)))``; transposed attention; ``pw`` out."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = _conv1x1(dim, dim * 3, bias)
        self.qkv_dwconv = _dwconv(dim * 3, 3, bias)
        self.project_out = _conv1x1(dim, dim, bias)

    @annotate("MDTA")
    def forward(self, x: torch.Tensor, norm: Optional[LayerNorm] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``MDTA(norm(x)) + residual`` (norm and residual optional): two fused ops."""
        q, k, v = pw_dw(x, self.qkv, self.qkv_dwconv, norm).chunk(3, dim=1)
        return channel_attention(q, k, v, self.temperature, self.project_out, residual)


class CrossAttention(nn.Module):
    """``q = dw_3(pw(x))``, ``k, v = split(dw_7(pw(y)))``; transposed attention; ``pw`` out."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = _conv1x1(dim, dim, bias)
        self.q_dwconv = _dwconv(dim, 3, bias)
        self.kv = _conv1x1(dim, dim * 2, bias)
        self.kv_dwconv = _dwconv(dim * 2, 7, bias)
        self.project_out = _conv1x1(dim, dim, bias)

    @annotate("CrossAttention")
    def forward(self, x: torch.Tensor, y: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``CrossAttention(x, y) + residual``: three fused ops."""
        q = pw_dw(x, self.q, self.q_dwconv)
        k, v = pw_dw(y, self.kv, self.kv_dwconv).chunk(2, dim=1)
        return channel_attention(q, k, v, self.temperature, self.project_out, residual)


class FeedForward(nn.Module):
    """GDFN: ``pw(gelu(a) * b)`` with ``a, b = split(dw_3(pw(x)))``, exact GELU."""

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.project_in = _conv1x1(dim, hidden * 2, bias)
        self.dwconv = _dwconv(hidden * 2, 3, bias)
        self.project_out = _conv1x1(hidden, dim, bias)

    @annotate("GDFN")
    def forward(self, x: torch.Tensor, norm: Optional[LayerNorm] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``GDFN(norm(x)) + residual`` (norm and residual optional): two fused ops."""
        h = pw_dw(x, self.project_in, self.dwconv, norm, gated=True)
        return ops.pointwise_conv(h, *weight_bias(self.project_out), residual)


class FFTAttention(nn.Module):
    """Parameters of the expert body, window FFT attention over ``p x p`` windows (the computation runs
    inside :func:`moce_kernels.ops.moe_experts`; names: :class:`moce_kernels.ops.ExpertWeights`)."""

    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.q = _conv1x1(dim, dim, False)
        self.q_dwconv = _dwconv(dim, 3, True)
        self.kv = _conv1x1(dim, dim * 2, False)
        self.kv_dwconv = _dwconv(dim * 2, 7, True)
        self.norm = LayerNorm(dim, "WithBias")
        self.proj_out = _conv1x1(dim, dim, True)


class HighPassConv2d(nn.Module):
    """Depthwise 3x3 initialised to the Laplacian high-pass kernel (trainable)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False, groups=c)
        kernel = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]])
        with torch.no_grad():
            self.conv.weight.copy_(kernel.expand(c, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FrequencyEmbedding(nn.Module):
    """Router input from the bottleneck: ``MLP(mean_HW(gelu(highpass(x))))``, (B, d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.high_conv = nn.Sequential(HighPassConv2d(dim), nn.GELU())
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    @annotate("FrequencyEmbedding")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.high_conv(x).mean(dim=(-2, -1)))


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_c: int, embed_dim: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """3x3 conv C -> C/2, PixelUnshuffle(2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """3x3 conv C -> 2C, PixelShuffle(2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
