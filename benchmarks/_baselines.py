"""The baselines every whole-model speed-up is measured against.

* **reference eager**: the model on backend ``reference``: every op runs its pure-PyTorch reference
  (the authors' math: LayerNorm, 1x1 and depthwise convolutions, normalised channel attention, FFT
  window attention, the per-expert loop), eagerly.
* **torch.compile(reference)**: the same math compiled by Inductor with the math *visible*: each of
  our ops whose reference is traceable is decomposed into its reference before Inductor sees the graph
  (a ``torch.library`` op is otherwise opaque to Inductor, and an opaque reference would be a weaker
  baseline than compiling the authors' code). Dispatch and the expert stage stay opaque: their
  reference reads the routing on the host (as the authors' per-expert loop does).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import torch

import moce_kernels  # noqa: F401  (defines torch.ops.moce)
from moce_kernels.reference import channel_attention, expert_conv, norm_conv, routing, window_attention


def reference_decompositions() -> Dict[torch._ops.OpOverload, Callable]:
    """Our ops (their default overloads) -> their traceable reference functions."""
    ops = torch.ops.moce
    table = {
        ops.window_fft_attention.default: window_attention.window_fft_attention,
        ops.pointwise_depthwise_conv.default: expert_conv.pointwise_depthwise_conv,
        ops.pointwise_depthwise_conv_gated.default: expert_conv.pointwise_depthwise_conv_gated,
        ops.layer_norm_pointwise_depthwise_conv.default: norm_conv.layer_norm_pointwise_depthwise_conv,
        ops.layer_norm_pointwise_depthwise_conv_gated.default: functools.partial(
            norm_conv.layer_norm_pointwise_depthwise_conv, gated=True),
        ops.layer_norm_pointwise_conv.default: norm_conv.layer_norm_pointwise_conv,
        ops.pointwise_conv.default: norm_conv.pointwise_conv,
        ops.channel_attention.default: channel_attention.channel_attention,
        ops.moe_route.default: routing.route,
        ops.moe_combine.default: routing.combine,
    }
    return table


def compile_reference(model: torch.nn.Module) -> Callable:
    """``torch.compile`` (Inductor, static shapes) of ``model`` with our traceable ops decomposed into
    their references; call it under ``moce_kernels.backend("reference")`` (for the opaque ones)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = dict(select_decomp_table())
    table.update(reference_decompositions())

    def inductor_with_references(gm: torch.fx.GraphModule, example_inputs):
        return compile_fx(gm, example_inputs, decompositions=table)

    return torch.compile(model, backend=inductor_with_references, dynamic=False)
