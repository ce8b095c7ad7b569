"""Encoder, decoder and residual-group blocks of MoCE-IR."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .. import ops
from ..nvtx import annotate
from .layers import Attention, CrossAttention, FeedForward, LayerNorm, weight_bias
from .moe import AdapterLayer


class ConcatCache:
    """``torch.cat`` of a fixed list of parameters, built once and reused while each of them is the
    same tensor with the same storage and ``_version`` (an in-place update bumps the version).

    Built on every call instead where reusing it would be wrong: while autograd records (the
    gradient must reach each parameter), inside ``torch.compile`` (the graph concatenates), and
    while a CUDA graph is captured (the graph must read the parameters themselves, so that it sees
    weights loaded in place).
    """

    def __init__(self) -> None:
        self._sig: Optional[List[Tuple[int, int, int]]] = None
        self._value: Optional[torch.Tensor] = None

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``torch.cat(tensors)``."""
        t0 = tensors[0]
        if ((torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or torch.compiler.is_compiling()
                or (t0.is_cuda and torch.cuda.is_current_stream_capturing())):
            return torch.cat(list(tensors))
        sig = [(id(t), t.data_ptr(), t._version) for t in tensors]
        if sig != self._sig:
            self._value, self._sig = torch.cat(list(tensors)), sig
        return self._value


class EncoderBlock(nn.Module):
    """``x += MDTA(LN(x)); x += GDFN(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layer_norm_type: str):
        super().__init__()
        self.norms = nn.ModuleList([LayerNorm(dim, layer_norm_type), LayerNorm(dim, layer_norm_type)])
        self.mixer = Attention(dim, num_heads, bias)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)

    @annotate("EncoderBlock")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Four fused ops: LN->qkv, attention->project_out(+x), LN->GDFN in, project_out(+x)."""
        x = self.mixer(x, self.norms[0], residual=x)
        return self.ffn(x, self.norms[1], residual=x)


class DecoderBlock(nn.Module):
    """``n = LN(x)``; ``s = MDTA(pw_s(n))``; ``a = MoCE(pw_a(n), freq, s)``; ``x = Cross(a, s) + x``;
    ``x += GDFN(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_expansion_factor: float, bias: bool, layer_norm_type: str,
                 rank: int, num_experts: int, top_k: int, depth_type: Union[str, int], rank_type: str,
                 stage_depth: int, freq_dim: int, with_complexity: bool, complexity_scale: str,
                 routing_noise: str):
        super().__init__()
        self.norms = nn.ModuleList([LayerNorm(dim, layer_norm_type), LayerNorm(dim, layer_norm_type)])
        self.proj = nn.ModuleList([nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)])
        self.shared = Attention(dim, num_heads, bias)
        self.mixer = CrossAttention(dim, num_heads, bias)
        self.ffn = FeedForward(dim, ffn_expansion_factor, bias)
        self.adapter = AdapterLayer(dim, rank, num_experts=num_experts, top_k=top_k, stage_depth=stage_depth,
                                    depth_type=depth_type, rank_type=rank_type, freq_dim=freq_dim,
                                    with_complexity=with_complexity, complexity_scale=complexity_scale,
                                    routing_noise=routing_noise)
        self._proj_weight, self._proj_bias = ConcatCache(), ConcatCache()

    @annotate("DecoderBlock")
    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        norm = self.norms[0]
        p0, p1 = self.proj
        (w0, b0), (w1, b1), (norm_w, norm_b) = weight_bias(p0), weight_bias(p1), norm.affine()
        s, a = ops.layer_norm_pointwise_conv(  # both projections of LN(x) in one pass over x
            x, norm_w, norm_b, self._proj_weight((w0, w1)), self._proj_bias((b0, b1)), norm.eps, chunks=2)
        s = self.shared(s)
        a = self.adapter(a, freq_emb, s)
        x = self.mixer(a, s, residual=x)
        x = self.ffn(x, self.norms[1], residual=x)
        return x, self.adapter.loss


class EncoderResidualGroup(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_blocks: int, ffn_expansion: float, layer_norm_type: str,
                 bias: bool):
        super().__init__()
        self.layers = nn.ModuleList([EncoderBlock(dim, num_heads, ffn_expansion, bias, layer_norm_type)
                                     for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class DecoderResidualGroup(nn.Module):
    """Decoder blocks in sequence; ``self.loss`` sums their auxiliary losses."""

    def __init__(self, dim: int, num_heads: int, num_blocks: int, **block_kwargs):
        super().__init__()
        self.layers = nn.ModuleList([DecoderBlock(dim, num_heads, **block_kwargs) for _ in range(num_blocks)])
        self.loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, freq_emb: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, loss = layer(x, freq_emb)
            total = total + loss
        self.loss = total
        return x
