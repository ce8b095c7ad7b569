"""The ops layer: every mission computation of the model goes through these functions.

Each is an op of namespace ``moce`` declared once (:mod:`._declare`): schema, fake implementation,
input check, op family, autograd formula, optional lowering, and its implementations per backend (see
:mod:`moce_kernels.backends`), the choice memoized per call key. :func:`declarations` lists them,
:func:`declaration` finds one by name, :func:`explain` says which implementation runs given inputs and why.
"""
from ..expert_stage.weights import ExpertWeights
from ._declare import declaration, declarations, explain
from .channel_attention import channel_attention
from .expert_conv import pointwise_depthwise_conv, pointwise_depthwise_conv_gated
from .expert_stage import experts as moe_experts
from .norm_conv import (layer_norm_pointwise_conv, layer_norm_pointwise_depthwise_conv,
                        layer_norm_pointwise_depthwise_conv_gated, pointwise_conv)
from .routing import combine as moe_combine
from .routing import dispatch as moe_dispatch
from .routing import route as moe_route
from .window_attention import window_fft_attention

__all__ = ["window_fft_attention", "pointwise_depthwise_conv", "pointwise_depthwise_conv_gated", "moe_route",
           "moe_dispatch", "moe_experts", "moe_combine", "ExpertWeights", "channel_attention",
           "layer_norm_pointwise_depthwise_conv", "layer_norm_pointwise_depthwise_conv_gated",
           "layer_norm_pointwise_conv", "pointwise_conv", "declaration", "declarations", "explain"]
